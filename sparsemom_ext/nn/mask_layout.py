"""SparseLinear and SparseConv2d: nn.Linear / nn.Conv2d with a fixed set of active weights (mask layout).

The mask layout keeps ``weight`` as the dense Parameter of the torch layer and adds a
persistent bool buffer ``mask``: the state_dict is nn.Linear's / nn.Conv2d's plus
``mask``. The weight is kept exactly zero at inactive positions by whoever changes it:
the layer itself (construction, ``load_state_dict``), the fused optimizers of
:mod:`sparsemom_ext.optim` (they find the mask attached to the weight with
:func:`sparsemom_ext.mask_of`) and the sparse-training engine. With a plain
``torch.optim`` optimizer call ``sparsemom_ext.mask_apply_(layer.weight.data,
layer.mask)`` after each step, or inactive weights drift away from zero.

The forward pass of SparseConv2d is ``nn.Conv2d``'s own (no masking at run time, so at
``density=1.0`` the layers are exactly their torch parents); that of SparseLinear is
chosen by ``backend``: ``"dense"`` is ``F.linear``, ``"sparse"`` runs the forward product
and the input's gradient with the sparse kernels and computes the dense weight gradient
(which exact sparse momentum grows from) with one dense matmul
(:func:`sparsemom_ext.ops.masked_linear`), and ``"auto"`` (the default) picks
``"sparse"`` where it is faster: see :meth:`SparseLinear.uses_sparse_kernels`. The sparse
backend derives the mask's structure once per mask version and, before each forward that
reuses it, checks that the mask still holds exactly that structure
(:func:`sparsemom_ext.ops.mask_matches_csr`, one pass over the mask): a mask changed in
place is seen however it was written, through the tensor (``mask.copy_(...)``,
``mask[...] = ...``, as the engine does) or where its version counter does not see it
(``.data``, numpy, DLPack). Keep the weight zero where a mask you wrote is False, as with
every writer of the mask.

The always-sparse layouts are their own classes, :class:`sparsemom_ext.nn.CsrLinear` and
:class:`sparsemom_ext.nn.CsrConv2d`; :func:`sparsemom_ext.nn.to_layout` converts (a csr
layer's state_dict also loads into these layers, and theirs into it).
"""

import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..csr_structure import check_canonical_structure, csr_from_mask, csr_to_dense, csr_to_mask
from ..ops import mask_apply_
from ..sparsity.masks import attach_mask, non_bool_masks
from ..sparsity.init import check_density, exact_count, random_mask, check_generator

__all__ = ["BACKENDS", "LAYOUTS", "SparseConv2d", "SparseLinear", "check_layout"]

LAYOUTS = ("mask", "csr")
BACKENDS = ("auto", "dense", "sparse")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_layout(layout) -> str:
    """``layout`` if it is implemented, else a ValueError listing the valid layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(repr(l) for l in LAYOUTS)}, got {layout!r}")
    return layout


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    return backend


def _in_graph_capture() -> bool:
    """Whether this forward is being captured into a graph (compile, export or jit.trace)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


@torch.no_grad()
def _zero_inactive(weight: torch.Tensor, mask: torch.Tensor) -> None:
    # The extension op covers the float dtypes on CPU/CUDA/meta; anything else
    # (complex, another backend) still gets the same result from masked_fill_.
    if weight.dtype in _KERNEL_DTYPES and weight.device.type in ("cpu", "cuda", "meta"):
        mask_apply_(weight, mask)
    else:
        weight.masked_fill_(~mask, 0)


class _MaskLayoutMixin:
    """What SparseLinear and SparseConv2d share: the mask buffer and its attachment."""

    weight: nn.Parameter
    mask: torch.Tensor

    layout = "mask"
    #: Set by the sparse-training engine while it reads this layer's batches
    #: (:class:`~sparsemom_ext.sparsity.taps.GradientTap`), else None.
    gradient_tap = None

    def _tapped(self, input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        tap = self.gradient_tap
        return output if tap is None else tap(input, output)

    def _init_mask(self, count: int, generator: Optional[torch.Generator]) -> None:
        mask = random_mask(self.weight.shape, count, generator, device=self.weight.device)
        self.register_buffer("mask", mask, persistent=True)
        if count < mask.numel():
            _zero_inactive(self.weight, self.mask)
        attach_mask(self.weight, self.mask)

    def _reattach_mask(self) -> None:
        # Module.type() casts buffers too; the mask must stay bool for the kernels.
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()
        attach_mask(self.weight, self.mask)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.double() may replace the mask buffer (new device) or the
        # weight Parameter (swap/overwrite modes): the attachment follows both.
        result = super()._apply(fn, recurse)
        self._reattach_mask()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        try:
            state_dict = self._mask_keys_from_csr_layout(state_dict, prefix)
        except (ValueError, TypeError, RuntimeError) as exc:
            error_msgs.append(f"invalid CSR structure for {prefix or 'the layer'}: {exc}")
            return
        bad = non_bool_masks(state_dict, [prefix + "mask"])
        if bad:
            error_msgs.extend(bad)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # Copies are in place (the attachment survives), but assign=True replaces the
        # tensors, and a checkpoint's weight may be nonzero where its mask is off.
        self._reattach_mask()
        _zero_inactive(self.weight, self.mask)

    def __setstate__(self, state):
        # Parameter.__deepcopy__ and pickling drop the attribute the mask hangs on.
        super().__setstate__(state)
        if "mask" in self._buffers and "weight" in self._parameters:
            self._reattach_mask()

    def _mask_keys_from_csr_layout(self, state_dict, prefix: str):
        """``state_dict`` with a csr layer's (CsrLinear's, CsrConv2d's) ``values``, ``row_ptr`` and
        ``col_idx`` under ``prefix`` (the first ``row_ptr[-1]`` value slots used, the weight as
        its ``(n_rows, n_cols)`` matrix) replaced by this layout's dense ``weight`` and ``mask``,
        else ``state_dict`` itself."""
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        if not all(k in state_dict for k in keys) or prefix + "weight" in state_dict:
            return state_dict
        values, row_ptr, col_idx = (state_dict[k] for k in keys)
        if values.dim() != 1 or values.shape != col_idx.shape:
            raise ValueError(f"values and col_idx must be 1-D with one entry per value slot, got shapes "
                             f"{tuple(values.shape)} and {tuple(col_idx.shape)}")
        nnz = int(row_ptr[-1]) if row_ptr.dim() == 1 and row_ptr.numel() else -1
        if not 0 <= nnz <= col_idx.numel():
            raise ValueError(f"row_ptr must be 1-D and end at nnz <= capacity = {col_idx.numel()}")
        shape = self.weight.shape
        n_rows, n_cols = shape[0], math.prod(shape[1:])
        check_canonical_structure(row_ptr, col_idx[:nnz], n_rows, n_cols)
        converted = {k: v for k, v in state_dict.items() if k not in keys}
        converted[prefix + "weight"] = csr_to_dense(values[:nnz], row_ptr, col_idx[:nnz], n_cols).reshape(shape)
        converted[prefix + "mask"] = csr_to_mask(row_ptr, col_idx[:nnz], n_cols).reshape(shape)
        return converted

    @property
    def nnz(self) -> int:
        """The number of active weights (True entries of ``mask``)."""
        return int(self.mask.count_nonzero())

    @property
    def weight_shape(self) -> torch.Size:
        """The shape of the (dense) weight."""
        return self.weight.shape

    @property
    def density(self) -> float:
        """The current fraction of active weights, ``nnz / numel`` (0.0 for a weight with no entries)."""
        numel = math.prod(self.weight_shape)
        return self.nnz / numel if numel else 0.0

    def dense_weight(self) -> torch.Tensor:
        """A new tensor: the weight with exact zeros at inactive positions, detached."""
        return self.weight.detach().masked_fill(~self.mask, 0)

    def extra_repr(self) -> str:
        density = "?" if self.mask.is_meta else f"{self.density:.4g}"
        return f"{super().extra_repr()}, density={density}"

    @classmethod
    def _wrap(cls, module, count: int, generator: Optional[torch.Generator]):
        """A layer of ``cls`` holding a copy of ``module``'s parameters, ``count`` of them active."""
        weight = module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"cannot sparsify a lazy {type(module).__name__} before its first forward pass "
                "(its weight shape is not known yet)"
            )
        # Built on the meta device: no allocation and no draw from torch's RNG for a
        # default initialisation that is overwritten right away.
        new = cls._from_dense_skeleton(module)
        new.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        new.train(module.training)
        new._init_mask(count, generator)
        return new

    @classmethod
    def from_dense(cls, module, density: float = 1.0, *, generator: Optional[torch.Generator] = None):
        """Wrap a dense torch layer: a new sparse layer with a copy of its parameters.

        The weight keeps ``module``'s values at the ``round(density * numel)`` active
        positions (drawn as in the constructor) and is zero elsewhere; the bias is
        copied; device, dtype, ``requires_grad`` and train/eval mode are ``module``'s.
        ``module`` itself is not modified. Build the optimizer after converting.
        """
        density = check_density(density)
        check_generator(generator)
        if not isinstance(module, cls._dense_cls):
            raise TypeError(
                f"module must be an {cls._dense_cls.__module__}.{cls._dense_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        return cls._wrap(module, exact_count(density, math.prod(module.weight.shape)), generator)


class SparseLinear(_MaskLayoutMixin, nn.Linear):
    """``nn.Linear`` whose weight has a fixed number of active (nonzero) entries.

    ``nn.Linear.__init__`` runs first (same parameters, same initialisation, same RNG
    use), then ``round(density * in_features * out_features)`` positions are drawn with
    :func:`sparsemom_ext.sparsity.init.random_mask` from ``generator`` (a CPU
    generator; None: torch's default one) and the others are zeroed. ``density=1.0``
    is exactly ``nn.Linear`` (nothing is drawn). A density so small that it rounds to 0
    weights is allowed: the layer then outputs its bias only.

    ``weight`` is the dense Parameter and the persistent bool buffer ``mask`` is
    attached to it, so the fused optimizers and the engine find it. ``backend`` picks
    the kernels of its forward/backward (module docstring).
    :func:`sparsemom_ext.nn.to_layout` converts to the always-sparse
    :class:`~sparsemom_ext.nn.CsrLinear`, keeping the function.
    """

    _dense_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, density: float = 1.0, backend: str = "auto", generator: Optional[torch.Generator] = None):
        # Validated before nn.Linear.__init__, so a bad call draws nothing from the RNG.
        density = check_density(density)
        backend = check_backend(backend)
        check_generator(generator)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.backend = backend
        self._init_mask(exact_count(density, self.weight.numel()), generator)

    @classmethod
    def _from_dense_skeleton(cls, module: nn.Linear) -> "SparseLinear":
        return cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                   dtype=module.weight.dtype)

    @classmethod
    def from_weight_and_mask(cls, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             *, requires_grad: bool = True, training: bool = True,
                             backend: str = "auto") -> "SparseLinear":
        """A layer with copies of ``weight`` (zeroed off ``mask``), ``mask`` and ``bias``."""
        backend = check_backend(backend)
        if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"weight must be 2-D and mask a bool tensor of its shape, got weight "
                             f"{tuple(weight.shape)} and mask {mask.dtype} {tuple(mask.shape)}")
        new = cls(weight.shape[1], weight.shape[0], bias is not None, device="meta", dtype=weight.dtype,
                  backend=backend)
        new.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        new.mask = mask.detach().clone()
        _zero_inactive(new.weight, new.mask)
        attach_mask(new.weight, new.mask)
        new.train(training)
        return new

    # ----------------------------------------------------------------- forward
    def uses_sparse_kernels(self, x: torch.Tensor) -> bool:
        """Whether the forward of ``x`` runs the sparse kernels.

        ``backend="sparse"`` yes, ``"dense"`` no, ``"auto"`` when the sparse forward +
        input gradient are faster than dense, as measured by ``bench/bench_spmm.py`` on
        CPU: float32 input on CPU, density at most ``AUTO_MAX_DENSITY`` and a weight of
        at least ``AUTO_MIN_NUMEL`` entries (smaller layers are too quick for the
        difference to matter), autocast off. Elsewhere (CUDA, other dtypes) auto stays dense: those
        kernels are not tuned to beat cuBLAS/MKL yet. Under torch.compile, torch.export and
        torch.jit.trace: no (``"sparse"`` raises), so graphs need no data-dependent structure.
        """
        if _in_graph_capture():
            # The sparse kernels' structure is derived from the mask's contents once per mask
            # version: data-dependent, which a graph cannot hold, and the mask changes at every
            # topology update. Graphs take F.linear (inactive weights are exact zeros, so the
            # result is the same); the csr layout is the one whose graphs run sparse kernels.
            if self.backend == "sparse":
                raise RuntimeError("SparseLinear(backend='sparse') cannot be captured by torch.compile, "
                                   "torch.export or torch.jit.trace (its structure follows the mask's "
                                   "contents); use backend='auto' (dense in a graph) or the csr layout "
                                   "(sparsemom_ext.CsrLinear), whose graphs run the sparse kernels")
            return False
        if self.backend != "auto":
            return self.backend == "sparse"
        numel = self.in_features * self.out_features
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.mask.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu")  # measured in float32 only
                and numel >= self.AUTO_MIN_NUMEL
                and self._mask_structure_nnz() <= self.AUTO_MAX_DENSITY * numel)

    AUTO_MAX_DENSITY = 0.1
    AUTO_MIN_NUMEL = 1 << 16

    def _cached_for_mask(self, name: str, build, still_valid=None):
        """``build(mask)``, computed once per mask tensor and version (the engine updates the
        mask in place, which bumps its version counter) and kept in ``__dict__[name]``; with
        ``still_valid(mask, value)``, rebuilt also when that says the mask changed unseen.

        The entry also holds an alias of the mask it was built from: while it lives, no
        other mask can be allocated at its address, which with a reused address and an
        equal version counter would hit a stale entry.
        """
        mask = self.mask
        key = (mask.data_ptr(), mask._version, mask.device)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key or (still_valid is not None and not still_valid(mask, cached[1])):
            cached = (key, build(mask), mask.detach())
            self.__dict__[name] = cached
        return cached[1]

    def _mask_structure_nnz(self) -> int:
        # Counting the mask costs O(numel): done once per mask version, not per forward. A
        # write the version does not see leaves this count (auto's choice of kernels) stale
        # until the next version, never a result: the structure itself is checked.
        return self._cached_for_mask("_mask_nnz_cache", lambda mask: int(mask.count_nonzero()))

    def _mask_structure(self):
        """CSR structure of the mask, its transpose and each nonzero's flat index: built once per
        mask version, checked against the mask's contents at each use."""
        def build(mask):
            row_ptr, col_idx = csr_from_mask(mask)
            col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, self.in_features)
            flat_index = mask.reshape(-1).nonzero().reshape(-1)
            return (row_ptr, col_idx, col_ptr, row_idx, perm, flat_index)

        def still_valid(mask, structure):
            return ops.mask_matches_csr(mask, structure[0], structure[1])
        return self._cached_for_mask("_mask_structure_cache", build, still_valid)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.uses_sparse_kernels(input):
            return self._tapped(input, F.linear(input, self.weight, self.bias))
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(f"input must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(input.shape)}")
        if input.dtype != self.weight.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"input must have the layer's dtype {self.weight.dtype}, got {input.dtype}")
        return self._tapped(input, ops.masked_linear(input, self.weight, self.bias, *self._mask_structure()))

    def extra_repr(self) -> str:
        backend = f", backend={self.backend}" if self.backend != "auto" else ""
        return super().extra_repr() + backend


class SparseConv2d(_MaskLayoutMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight has a fixed number of active (nonzero) entries.

    Takes every ``nn.Conv2d`` argument (stride, padding incl. ``"same"``/``"valid"``,
    dilation, groups, bias, padding_mode, device, dtype) plus keyword-only
    ``density`` and ``generator``, and behaves like :class:`SparseLinear`:
    ``round(density * weight.numel())`` active positions of the
    ``(out_channels, in_channels // groups, kh, kw)`` weight, a persistent bool
    ``mask`` buffer attached to ``weight``, ``nn.Conv2d``'s own forward.
    """

    _dense_cls = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[str, int, tuple] = 0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None,
                 *, density: float = 1.0, generator: Optional[torch.Generator] = None):
        density = check_density(density)
        check_generator(generator)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_mask(exact_count(density, self.weight.numel()), generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._tapped(input, super().forward(input))

    @classmethod
    def _from_dense_skeleton(cls, module: nn.Conv2d) -> "SparseConv2d":
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                   module.padding, module.dilation, module.groups, module.bias is not None,
                   module.padding_mode, device="meta", dtype=module.weight.dtype)

    @classmethod
    def from_weight_and_mask(cls, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             *, stride=1, padding=0, requires_grad: bool = True,
                             training: bool = True) -> "SparseConv2d":
        """A conv (dilation 1, groups 1, zero padding: what a csr conv holds) with copies of the
        4-D ``weight`` (zeroed off ``mask``), ``mask`` and ``bias``."""
        if weight.dim() != 4 or mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"weight must be 4-D (out_channels, in_channels, kh, kw) and mask a bool tensor of its "
                             f"shape, got weight {tuple(weight.shape)} and mask {mask.dtype} {tuple(mask.shape)}")
        out_channels, in_channels, kh, kw = weight.shape
        new = cls(in_channels, out_channels, (kh, kw), stride, padding, bias=bias is not None, device="meta",
                  dtype=weight.dtype)
        new.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        new.mask = mask.detach().clone()
        _zero_inactive(new.weight, new.mask)
        attach_mask(new.weight, new.mask)
        new.train(training)
        return new
