"""sparsify(): turn a model's Linear/Conv2d layers into sparse ones; to_layout(); density_report()."""

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..sparsity.connectivity import check_connectivity, connect_rows, floor_counts, layer_floor
from ..sparsity.init import check_density, check_distribution, check_generator, layer_counts
from ..sparsity.masks import mask_of
from .attention import SparseMultiheadAttention, projection_weight_names
from .csr_layout import CsrConv2d, CsrLayer, CsrLinear, check_csr_conv_options, default_capacity
from .mask_layout import SparseConv2d, SparseLinear, check_layout

__all__ = ["DensityReport", "DensityRow", "density_report", "sparsify", "to_layout"]

_SPARSE_FOR = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d, nn.MultiheadAttention: SparseMultiheadAttention}
_SPARSE_TYPES = (SparseLinear, SparseConv2d, CsrLayer, SparseMultiheadAttention)
#: The attribute of a converted layer that records the torch class it replaced, so that
#: densify() gives back that class (MultiheadAttention's out_proj is a
#: NonDynamicallyQuantizableLinear, not an nn.Linear).
DENSE_CLASS_ATTR = "_sparsemom_dense_class"
#: The attribute of a TransformerEncoder(Layer) whose fused fast path sparsify() turned
#: off (a dict of the attributes it changed and their old values), for densify() to restore.
FAST_PATH_ATTR = "_sparsemom_fast_path"


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
    """The mask-layout class for a module sparsify() converts, else None."""
    if isinstance(module, _SPARSE_TYPES):
        return None
    for dense_cls, sparse_cls in _SPARSE_FOR.items():
        if isinstance(module, dense_cls):
            return sparse_cls
    return None


def _dense_base(module: nn.Module) -> type:
    return next(cls for cls in _SPARSE_FOR if isinstance(module, cls))


def _weight_names(module: nn.Module) -> Tuple[str, ...]:
    """The parameters of a converted module that become sparse."""
    if isinstance(module, nn.MultiheadAttention):
        return projection_weight_names(module)
    return ("weight",)


def _read_as_weight(model: nn.Module) -> set:
    """The ids of the linear layers that torch code reads as ``.weight`` instead of
    calling them: MultiheadAttention's ``out_proj`` (in every forward)."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _turn_off_fast_paths(model: nn.Module) -> None:
    """Keep torch's fused transformer fast paths, which read ``linear1.weight`` and
    ``linear2.weight`` (eval mode without grad), off for layers holding a CsrLinear.

    TransformerEncoderLayer takes its fast path only for a relu/gelu activation
    (``activation_relu_or_gelu``, read nowhere else), TransformerEncoder its nested-tensor
    path only with ``use_nested_tensor``; both then fall back to the modules' own forwards.
    The old values are kept for densify()."""
    def has_csr(layer):
        return isinstance(getattr(layer, "linear1", None), CsrLinear) or \
            isinstance(getattr(layer, "linear2", None), CsrLinear)

    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and has_csr(module):
            changes = {"activation_relu_or_gelu": 0}
        elif isinstance(module, nn.TransformerEncoder) and any(has_csr(layer) for layer in module.layers):
            changes = {"use_nested_tensor": False}
        else:
            continue
        saved = module.__dict__.setdefault(FAST_PATH_ATTR, {})
        for attr, value in changes.items():
            saved.setdefault(attr, getattr(module, attr))
            setattr(module, attr, value)


def sparsify(model: nn.Module, density: float, distribution: str = "uniform", layout: str = "mask",
             exclude: Iterable[Union[str, type]] = (), generator: Optional[torch.Generator] = None,
             connectivity: str = "floor") -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention`` of ``model`` by a sparse
    layer, in place.

    Each converted layer is ``SparseLinear.from_dense`` / ``SparseConv2d.from_dense`` of
    the original (its weight values kept at active positions, its bias, device, dtype
    and train/eval mode); with ``layout="csr"`` each SparseLinear then becomes a
    :class:`~sparsemom_ext.nn.CsrLinear` and each SparseConv2d a
    :class:`~sparsemom_ext.nn.CsrConv2d` (the same function, stored always-sparse) with
    ``default_capacity(nnz, numel, model_nnz, model_layers)`` value slots. The csr conv computes dilation
    1, groups 1, zero padding: a conv with anything else raises a ValueError naming it
    (exclude it, or use ``layout="mask"``), before anything is converted. An ``nn.MultiheadAttention``
    becomes a :class:`~sparsemom_ext.nn.SparseMultiheadAttention` (its input projection
    weights masked, its ``out_proj`` converted like any linear layer). Attention reads its
    weights as tensors (``in_proj_weight``, ``out_proj.weight``), so with ``layout="csr"``
    they stay in the mask layout, still sparse, with a warning naming them; torch's fused
    TransformerEncoder(Layer) fast paths, which read ``linear1.weight``, are turned off
    for layers holding a CsrLinear (they run their modules' forwards instead). The
    active counts come from
    :func:`sparsemom_ext.sparsity.init.layer_counts` over all converted weights together,
    so ``distribution`` ("uniform", "er", "erk") shapes the per-layer densities and the
    converted layers hold exactly ``round(density * their total weights)`` active
    weights. Masks are drawn layer by layer in ``named_modules()`` order from
    ``generator`` (a CPU generator; None: torch's default one).

    ``connectivity="floor"`` (default) gives every output unit of every converted weight (a
    row: an output feature, a conv's output channel) at least one input: a layer's count is
    raised to its number of rows if below (the difference is taken from the layers above
    theirs, so the total stays exact), and a drawn mask with empty rows has surplus
    positions moved into them (drawn from ``generator``; a mask without empty rows is kept
    as drawn). A ValueError says so when the density gives fewer weights than the layers
    have output units. ``"reference"`` draws the reference code's masks, which may leave a
    unit, or a small layer, without any weight (docs/algorithms.md, section 5).

    ``exclude`` holds module names as in ``named_modules()`` (``"fc3"``,
    ``"features.0"``; a container's name keeps everything inside it dense) and/or
    module classes (a layer that is, or sits inside, an instance stays dense). Layers
    that already are sparse (SparseLinear, SparseConv2d, CsrLinear, CsrConv2d, SparseMultiheadAttention)
    are left alone and do not count in the density. Biases, norm layers and other
    modules are untouched; forward hooks of a replaced layer are not carried over. Build
    the optimizer after sparsify().

    Returns ``model`` (or, when ``model`` itself is a Linear/Conv2d, its sparse
    replacement: use the return value). Raises ValueError for a bad density,
    distribution, layout, connectivity or unknown excluded name, for a density that gives
    fewer weights than output units under ``connectivity="floor"``, when nothing is left to convert, for
    an nn.Linear/Conv2d/MultiheadAttention subclass with its own forward (exclude it),
    and for a layer whose weight or bias is shared with another module (converting copies it, which
    would silently untie it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    density = check_density(density)
    distribution = check_distribution(distribution)
    layout = check_layout(layout)
    check_generator(generator)
    connectivity = check_connectivity(connectivity)
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
        dense_cls = _dense_base(module)
        if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{name or 'model'} is a lazy {type(module).__name__} whose shape is not known yet: "
                "run one forward pass before sparsify()"
            )
        if type(module).forward is not dense_cls.forward:
            raise ValueError(
                f"{name or 'model'} is a {type(module).__name__} with its own forward, which a sparse "
                f"{dense_cls.__name__} would not reproduce; pass it in exclude to keep it dense"
            )
        pnames = ("weight", "bias") if dense_cls is not nn.MultiheadAttention else tuple(module._parameters)
        for pname in pnames:
            p = getattr(module, pname)
            if p is not None and len(owners.get(id(p), ())) > 1:
                raise ValueError(
                    f"{name or 'model'}.{pname} is shared with another module (tied weights); converting "
                    "would untie it; pass the layer in exclude to keep it dense"
                )

    read_as_weight = _read_as_weight(model)
    if layout == "csr":
        for name, module in layers:
            if isinstance(module, nn.Conv2d):
                try:
                    check_csr_conv_options(module.kernel_size, module.stride, module.padding, module.dilation,
                                           module.groups, module.padding_mode)
                except ValueError as exc:
                    raise ValueError(
                        f"layout='csr' cannot convert {name or 'model'} ({module}): {exc}; the csr conv "
                        "supports dilation 1, groups 1, padding_mode 'zeros' and int/pair/'valid' padding: pass "
                        "it in exclude= to keep it dense, or use layout='mask'") from None
        in_mask = [name for name, module in layers if id(module) in read_as_weight]
        read = in_mask + [f"{name}.{pname}" for name, module in layers if isinstance(module, nn.MultiheadAttention)
                          for pname in _weight_names(module)]
        if read:
            warnings.warn(
                f"sparsify(layout='csr'): {', '.join(read)} {'is' if len(read) == 1 else 'are'} read by "
                "nn.MultiheadAttention as dense weight tensors (in_proj_weight, out_proj.weight), which a "
                "CsrLinear does not have: they are sparse in the mask layout instead (the engine trains both "
                "layouts together); exclude nn.MultiheadAttention to keep them dense",
                stacklevel=2,
            )
    else:
        in_mask = []
    # One count per sparse weight (an attention layer has up to three), over all of them.
    units = [(name, module, pname) for name, module in layers for pname in _weight_names(module)]
    shapes = [getattr(module, pname).shape for _, module, pname in units]
    counts = layer_counts(shapes, density, distribution)
    if connectivity == "floor":
        floors = [layer_floor(s[0], math.prod(s[1:])) if len(s) else 0 for s in shapes]
        counts = floor_counts(counts, floors, [f"{name or 'model'}.{pname}" for name, _, pname in units])
    count_of = {(id(module), pname): count for (_, module, pname), count in zip(units, counts)}
    replacement = {}
    for name, module in layers:
        sparse_cls = _sparse_class(module)
        if sparse_cls is SparseMultiheadAttention:
            sparse = sparse_cls.from_dense(
                module, {pname: count_of[id(module), pname] for pname in _weight_names(module)}, generator)
            if connectivity == "floor":
                for pname, _, _ in sparse.masked_weights():
                    _connect(sparse, pname, pname + "_mask", getattr(module, pname), generator)
        else:
            count = count_of[id(module), "weight"]
            sparse = sparse_cls._wrap(module, count, generator)
            if connectivity == "floor":
                _connect(sparse, "weight", "mask", module.weight, generator)
            if layout == "csr" and name not in in_mask:
                sparse = to_layout(sparse, "csr",
                                   capacity=default_capacity(count, module.weight.numel(), sum(counts),
                                                            len(counts)))
        sparse.__dict__[DENSE_CLASS_ATTR] = type(module)
        replacement[id(module)] = sparse
    # A converted attention layer holds a copy of the old out_proj: give it the converted one.
    for name, module in layers:
        sparse = replacement[id(module)]
        if isinstance(sparse, SparseMultiheadAttention) and id(module.out_proj) in replacement:
            sparse.out_proj = replacement[id(module.out_proj)]

    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[child_name] = replacement[id(child)]
    model = replacement.get(id(model), model)
    _turn_off_fast_paths(model)
    return model


@torch.no_grad()
def _connect(sparse: nn.Module, weight_name: str, mask_name: str, dense_weight: torch.Tensor,
             generator: Optional[torch.Generator]) -> None:
    """Give every empty row of ``sparse``'s mask an active position (:func:`connect_rows`), in
    place (the mask stays the tensor the weight and optimizers know); the weight takes
    ``dense_weight``'s values at the new mask, as when it was drawn."""
    mask = getattr(sparse, mask_name)
    connected = connect_rows(mask, generator)
    if connected is mask:
        return
    mask.copy_(connected)
    getattr(sparse, weight_name).copy_(dense_weight.detach().masked_fill(~connected, 0))


def to_layout(layer: nn.Module, layout: str, *, capacity: Optional[int] = None) -> nn.Module:
    """``layer`` (a sparse linear or conv layer) in ``layout``: ``layer`` itself when it
    already is, else a new layer computing the same function with the same active weights,
    bias, device, dtype and mode: a :class:`CsrLinear` / :class:`CsrConv2d` (``capacity``
    value slots; None: its default) for ``"csr"``, a :class:`SparseLinear` /
    :class:`SparseConv2d` for ``"mask"``. Build the optimizer after converting. A
    SparseConv2d with dilation, groups, a padding mode or ``"same"`` padding has no csr
    form: a ValueError names what is supported."""
    layout = check_layout(layout)
    if not isinstance(layer, (SparseLinear, SparseConv2d, CsrLayer)):
        raise TypeError(f"layer must be a SparseLinear, SparseConv2d, CsrLinear or CsrConv2d, got "
                        f"{type(layer).__name__}")
    if layer.layout == layout:
        return layer
    if layout == "csr":
        csr_cls = CsrConv2d if isinstance(layer, SparseConv2d) else CsrLinear
        return _keep_dense_class(layer, csr_cls.from_mask_layer(layer, capacity=capacity))
    if isinstance(layer, CsrConv2d):
        new = SparseConv2d.from_weight_and_mask(layer.dense_weight(), layer.mask, layer.bias, stride=layer.stride,
                                                padding=layer.padding, requires_grad=layer.values.requires_grad,
                                                training=layer.training)
    else:
        new = SparseLinear.from_weight_and_mask(layer.dense_weight(), layer.mask, layer.bias,
                                                requires_grad=layer.values.requires_grad, training=layer.training)
    return _keep_dense_class(layer, new)


def _keep_dense_class(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new``, recording the torch class ``old`` replaced (if sparsify recorded one)."""
    if DENSE_CLASS_ATTR in old.__dict__:
        new.__dict__[DENSE_CLASS_ATTR] = old.__dict__[DENSE_CLASS_ATTR]
    return new


@dataclass(frozen=True)
class DensityRow:
    """One line of a :class:`DensityReport`: a weight of the model, or the total.

    ``sparse``: whether the weight is sparse (a mask or the csr layout); a dense weight
    has ``nnz == numel``."""

    name: str
    kind: str
    shape: Tuple[int, ...]
    nnz: int
    numel: int
    density: float
    sparse: bool = True


@dataclass(frozen=True)
class DensityReport:
    """The active-weight counts of every weight of a model.

    ``rows``: one :class:`DensityRow` per weight, in ``named_modules()`` order: the
    sparse ones (SparseLinear, SparseConv2d, CsrLinear, CsrConv2d, the projections of a
    SparseMultiheadAttention, any parameter given a mask with
    :func:`sparsemom_ext.attach_mask`) and the dense ones (every other parameter of at
    least two dimensions: the weights of dense Linear, Conv, Embedding, attention layers;
    biases and norm scales are not counted). A module's ``weight`` is named by the module,
    another parameter by its full name (``"layers.0.self_attn.in_proj_weight"``).
    ``total``: their sums (name ``"total"``); ``total_density``: ``total.nnz /
    total.numel``, the model's density (0.0 without weights). ``str(report)`` is an
    aligned table.
    """

    rows: Tuple[DensityRow, ...]
    total: DensityRow

    @property
    def total_density(self) -> float:
        """Active weights over all weights of the model."""
        return self.total.density

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"layers": [...], "total": {...}}``."""
        def row(r):
            return {"name": r.name, "kind": r.kind, "shape": list(r.shape), "nnz": r.nnz,
                    "numel": r.numel, "density": r.density, "sparse": r.sparse}
        return {"layers": [row(r) for r in self.rows], "total": row(self.total)}

    def __str__(self) -> str:
        header = ("name", "kind", "shape", "nnz", "numel", "density")
        lines = [
            (r.name or "(model)", r.kind if r.sparse else f"{r.kind} (dense)", "x".join(map(str, r.shape)),
             str(r.nnz), str(r.numel), f"{r.density:.4f}")
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
        body = [fmt(line) for line in lines[:-1]] or ["(no weights)"]
        return "\n".join([fmt(header), rule, *body, rule, fmt(lines[-1])])


def density_report(model: nn.Module) -> DensityReport:
    """A :class:`DensityReport` of every weight of ``model``, sparse and dense."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows: List[DensityRow] = []
    seen = set()  # a weight shared by two modules (tied) is one weight

    def add(name, module, shape, nnz, sparse):
        numel = math.prod(shape)
        rows.append(DensityRow(name, type(module).__name__, tuple(shape), nnz, numel,
                               nnz / numel if numel else 0.0, sparse))

    for name, module in model.named_modules():
        if isinstance(module, CsrLayer):
            seen.add(id(module.values))
            add(name, module, module.weight_shape, module.nnz, True)
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            row_name = name if pname == "weight" else (f"{name}.{pname}" if name else pname)
            mask = mask_of(p)
            if mask is not None:
                add(row_name, module, p.shape, int(mask.count_nonzero()), True)
            elif p.dim() >= 2:
                add(row_name, module, p.shape, p.numel(), False)
    nnz = sum(r.nnz for r in rows)
    numel = sum(r.numel for r in rows)
    total = DensityRow("total", "", (), nnz, numel, nnz / numel if numel else 0.0, any(r.sparse for r in rows))
    return DensityReport(tuple(rows), total)
