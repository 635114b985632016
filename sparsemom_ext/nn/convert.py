"""sparsify(): turn a model's Linear/Conv2d layers into sparse ones; to_layout(); density_report()."""

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..sparsity.init import check_density, check_distribution, check_generator, layer_counts
from .csr_layout import CsrLinear, default_capacity
from .mask_layout import SparseConv2d, SparseLinear, check_layout

__all__ = ["DensityReport", "DensityRow", "density_report", "sparsify", "to_layout"]

_SPARSE_FOR = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}
_SPARSE_TYPES = (SparseLinear, SparseConv2d, CsrLinear)


def _normalise_exclude(exclude) -> Tuple[set, tuple]:
    # A bare string is iterable too: "fc3" must not become {"f", "c", "3"}.
    if exclude is None:
        exclude = ()
    elif isinstance(exclude, (str, type)):
        exclude = (exclude,)
    names, classes = set(), []
    for item in exclude:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type):
            classes.append(item)
        else:
            raise TypeError(
                f"exclude must hold module names (str) and/or module classes, got {type(item).__name__} {item!r}"
            )
    return names, tuple(classes)


def _sparse_class(module: nn.Module) -> Optional[type]:
    """The mask-layout class for a layer sparsify() converts, else None."""
    if isinstance(module, _SPARSE_TYPES):
        return None
    for dense_cls, sparse_cls in _SPARSE_FOR.items():
        if isinstance(module, dense_cls):
            return sparse_cls
    return None


def sparsify(model: nn.Module, density: float, distribution: str = "uniform", layout: str = "mask",
             exclude: Iterable[Union[str, type]] = (), generator: Optional[torch.Generator] = None) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by a sparse layer, in place.

    Each converted layer is ``SparseLinear.from_dense`` / ``SparseConv2d.from_dense`` of
    the original (its weight values kept at active positions, its bias, device, dtype
    and train/eval mode); with ``layout="csr"`` each SparseLinear then becomes a
    :class:`~sparsemom_ext.nn.CsrLinear` (the same function, stored always-sparse) with
    ``default_capacity(nnz, numel, model_nnz)`` value slots. The active counts come from
    :func:`sparsemom_ext.sparsity.init.layer_counts` over all converted layers together,
    so ``distribution`` ("uniform", "er", "erk") shapes the per-layer densities and the
    converted layers hold exactly ``round(density * their total weights)`` active
    weights. Masks are drawn layer by layer in ``named_modules()`` order from
    ``generator`` (a CPU generator; None: torch's default one).

    ``exclude`` holds module names as in ``named_modules()`` (``"fc3"``,
    ``"features.0"``; a container's name keeps everything inside it dense) and/or
    module classes (a layer that is, or sits inside, an instance stays dense). Layers
    that already are sparse (SparseLinear, SparseConv2d, CsrLinear) are left alone and do not count in the
    density. Biases, norm layers and other modules are untouched; forward hooks of a
    replaced layer are not carried over. Build the optimizer after sparsify().

    Returns ``model`` (or, when ``model`` itself is a Linear/Conv2d, its sparse
    replacement: use the return value). Raises ValueError for a bad density,
    distribution, layout or unknown excluded name, when nothing is left to convert, for
    an nn.Linear/Conv2d subclass with its own forward (exclude it), and for a layer
    whose weight or bias is shared with another module (converting copies it, which
    would silently untie it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    density = check_density(density)
    distribution = check_distribution(distribution)
    layout = check_layout(layout)
    check_generator(generator)
    excluded_names, excluded_classes = _normalise_exclude(exclude)

    occurrences = list(model.named_modules(remove_duplicate=False))
    by_name = dict(occurrences)
    unknown = sorted(excluded_names - by_name.keys())
    if unknown:
        examples = [n for n, _ in occurrences[1:4]]
        raise ValueError(
            f"exclude names modules that model does not have: {unknown}; names are those of "
            "model.named_modules()" + (f", e.g. {examples}" if examples else "")
        )

    def is_excluded(name: str) -> bool:
        parts = name.split(".") if name else []
        lineage = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(n in excluded_names or isinstance(by_name[n], excluded_classes) for n in lineage)

    # A module reachable under several names is one layer: convert it once, and keep
    # it dense if any of its names is excluded.
    candidates, excluded_ids = {}, set()
    for name, module in occurrences:
        if _sparse_class(module) is None:
            continue
        if is_excluded(name):
            excluded_ids.add(id(module))
        candidates.setdefault(id(module), (name, module))
    layers = [(name, module) for key, (name, module) in candidates.items() if key not in excluded_ids]
    if not layers:
        raise ValueError(
            "sparsify found no nn.Linear or nn.Conv2d to convert in model "
            "(none there, all already sparse, or all excluded)"
        )

    owners = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    for name, module in layers:
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{name or 'model'} is a lazy {type(module).__name__} whose shape is not known yet: "
                "run one forward pass before sparsify()"
            )
        dense_cls = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
        if type(module).forward is not dense_cls.forward:
            raise ValueError(
                f"{name or 'model'} is a {type(module).__name__} with its own forward, which a sparse "
                f"{dense_cls.__name__} would not reproduce; pass it in exclude to keep it dense"
            )
        for pname in ("weight", "bias"):
            p = getattr(module, pname)
            if p is not None and len(owners.get(id(p), ())) > 1:
                raise ValueError(
                    f"{name or 'model'}.{pname} is shared with another module (tied weights); converting "
                    "would untie it; pass the layer in exclude to keep it dense"
                )

    if layout == "csr":
        convs = [name or "model" for name, module in layers if isinstance(module, nn.Conv2d)]
        if convs:
            raise ValueError(
                f"layout='csr' is implemented for nn.Linear only; {', '.join(convs)} "
                f"{'is an nn.Conv2d' if len(convs) == 1 else 'are nn.Conv2d'}: pass "
                f"{'it' if len(convs) == 1 else 'them'} in exclude, or use layout='mask'"
            )
    counts = layer_counts([module.weight.shape for _, module in layers], density, distribution)
    replacement = {}
    for (name, module), count in zip(layers, counts):
        sparse = _sparse_class(module)._wrap(module, count, generator)
        if layout == "csr":
            sparse = to_layout(sparse, "csr", capacity=default_capacity(count, module.weight.numel(), sum(counts)))
        replacement[id(module)] = sparse

    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[child_name] = replacement[id(child)]
    return replacement.get(id(model), model)


def to_layout(layer: nn.Module, layout: str, *, capacity: Optional[int] = None) -> nn.Module:
    """``layer`` (a sparse linear layer) in ``layout``: ``layer`` itself when it already is,
    else a new layer computing the same function with the same active weights, bias,
    device, dtype and mode: a :class:`CsrLinear` (``capacity`` value slots; None: its
    default) for ``"csr"``, a :class:`SparseLinear` for ``"mask"``. Build the optimizer
    after converting. A SparseConv2d has the mask layout only."""
    layout = check_layout(layout)
    if not isinstance(layer, (SparseLinear, CsrLinear, SparseConv2d)):
        raise TypeError(f"layer must be a SparseLinear, CsrLinear or SparseConv2d, got {type(layer).__name__}")
    if layer.layout == layout:
        return layer
    if isinstance(layer, SparseConv2d):
        raise ValueError("layout='csr' is implemented for linear layers only; a SparseConv2d stays in the "
                         "mask layout")
    if layout == "csr":
        return CsrLinear.from_mask_layer(layer, capacity=capacity)
    return SparseLinear.from_weight_and_mask(layer.dense_weight(), layer.mask, layer.bias,
                                             requires_grad=layer.values.requires_grad, training=layer.training)


@dataclass(frozen=True)
class DensityRow:
    """One line of a :class:`DensityReport`: a sparse layer, or the total."""

    name: str
    kind: str
    shape: Tuple[int, ...]
    nnz: int
    numel: int
    density: float


@dataclass(frozen=True)
class DensityReport:
    """The active-weight counts of a model's sparse layers.

    ``rows``: one :class:`DensityRow` per sparse layer (SparseLinear, SparseConv2d, CsrLinear), in
    ``named_modules()`` order; ``total``: their sums (name ``"total"``);
    ``total_density``: ``total.nnz / total.numel`` (0.0 without sparse layers).
    Counts are those of the masks. ``str(report)`` is an aligned table.
    """

    rows: Tuple[DensityRow, ...]
    total: DensityRow

    @property
    def total_density(self) -> float:
        """Active weights over all weights of the sparse layers."""
        return self.total.density

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"layers": [...], "total": {...}}``."""
        def row(r):
            return {"name": r.name, "kind": r.kind, "shape": list(r.shape), "nnz": r.nnz,
                    "numel": r.numel, "density": r.density}
        return {"layers": [row(r) for r in self.rows], "total": row(self.total)}

    def __str__(self) -> str:
        header = ("name", "kind", "shape", "nnz", "numel", "density")
        lines = [
            (r.name or "(model)", r.kind, "x".join(map(str, r.shape)), str(r.nnz), str(r.numel), f"{r.density:.4f}")
            for r in self.rows
        ]
        total = self.total
        lines.append(("total", "", "", str(total.nnz), str(total.numel), f"{total.density:.4f}"))
        widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
        numeric = (False, False, False, True, True, True)

        def fmt(line):
            cells = [c.rjust(w) if right else c.ljust(w) for c, w, right in zip(line, widths, numeric)]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(header))
        body = [fmt(line) for line in lines[:-1]] or ["(no sparse layers)"]
        return "\n".join([fmt(header), rule, *body, rule, fmt(lines[-1])])


def density_report(model: nn.Module) -> DensityReport:
    """A :class:`DensityReport` of every sparse layer (SparseLinear, SparseConv2d, CsrLinear) in ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows: List[DensityRow] = []
    for name, module in model.named_modules():
        if isinstance(module, _SPARSE_TYPES):
            nnz, numel = module.nnz, math.prod(module.weight_shape)
            rows.append(DensityRow(name, type(module).__name__, tuple(module.weight_shape), nnz, numel,
                                   nnz / numel if numel else 0.0))
    nnz = sum(r.nnz for r in rows)
    numel = sum(r.numel for r in rows)
    total = DensityRow("total", "", (), nnz, numel, nnz / numel if numel else 0.0)
    return DensityReport(tuple(rows), total)
