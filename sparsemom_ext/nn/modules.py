"""SparseLinear and SparseConv2d: drop-in nn.Linear / nn.Conv2d with sparse weights.

Two layouts:

``"csr"`` (SparseLinear only) stores what is active and nothing else: the Parameter
``values`` (one entry per active weight, in row-major order) and the int32 buffers
``row_ptr`` / ``col_idx`` of the compressed-sparse-row structure (persistent: the
state_dict is ``values``, ``bias``, ``row_ptr``, ``col_idx``), plus the cached
transpose ``col_ptr`` / ``row_idx`` / ``perm`` (rebuilt, never saved). Forward and
backward run the sparse kernels (:func:`sparsemom_ext.ops.csr_linear`): the cost is
proportional to the number of active weights, and no dense weight or weight gradient
exists. ``mask`` and ``dense_weight()`` are computed on request.

Layout ``"mask"`` keeps ``weight`` as the dense Parameter of the
torch layer and adds a persistent bool buffer ``mask``: the state_dict is nn.Linear's /
nn.Conv2d's plus ``mask``. The weight is kept exactly zero at inactive positions by
whoever changes it: the layer itself (construction, ``load_state_dict``), the fused
optimizers of :mod:`sparsemom_ext.optim` (they find the mask attached to the weight
with :func:`sparsemom_ext.mask_of`) and the sparse-training engine. With a plain
``torch.optim`` optimizer call ``sparsemom_ext.mask_apply_(layer.weight.data,
layer.mask)`` after each step, or inactive weights drift away from zero.

In the mask layout the forward pass of SparseConv2d is ``nn.Conv2d``'s own (no masking
at run time, so at ``density=1.0`` the layers are exactly their torch parents); that of
SparseLinear is chosen by ``backend``: ``"dense"`` is ``F.linear``, ``"sparse"`` runs the
forward product and the input's gradient with the sparse kernels and computes the dense
weight gradient (which exact sparse momentum grows from) with one dense matmul, and
``"auto"`` (the default) picks ``"sparse"`` where it is faster: see
:meth:`SparseLinear.uses_sparse_kernels`.
"""

import copy
import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..ops import mask_apply_
from ..sparsity import attach_mask
from ..sparsity.init import check_density, exact_count, random_mask, check_generator

__all__ = ["BACKENDS", "LAYOUTS", "SparseConv2d", "SparseLinear"]

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

    @classmethod
    def _check_layout(cls, layout) -> str:
        return check_layout(layout)

    def _init_mask(self, count: int, layout: str, generator: Optional[torch.Generator]) -> None:
        self.layout = layout
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
        if self.layout == "mask":
            self._reattach_mask()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.layout != "mask":
            return
        # Copies are in place (the attachment survives), but assign=True replaces the
        # tensors, and a checkpoint's weight may be nonzero where its mask is off.
        self._reattach_mask()
        _zero_inactive(self.weight, self.mask)

    def __setstate__(self, state):
        # Parameter.__deepcopy__ and pickling drop the attribute the mask hangs on.
        super().__setstate__(state)
        if "mask" in self._buffers and "weight" in self._parameters:
            self._reattach_mask()

    @property
    def nnz(self) -> int:
        """The number of active weights (True entries of ``mask``)."""
        return int(self.mask.count_nonzero())

    @property
    def weight_shape(self) -> torch.Size:
        """The shape of the (dense) weight, in either layout."""
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
        meta = (self.values if self.layout == "csr" else self.mask).is_meta
        density = "?" if meta else f"{self.density:.4g}"
        return f"{super().extra_repr()}, density={density}, layout={self.layout}"

    @classmethod
    def _wrap(cls, module, count: int, layout: str, generator: Optional[torch.Generator]):
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
        new._init_mask(count, "mask", generator)
        if layout == "csr":
            new._convert_to_csr()
        return new

    @classmethod
    def from_dense(cls, module, density: float = 1.0, *, layout: str = "mask",
                   generator: Optional[torch.Generator] = None):
        """Wrap a dense torch layer: a new sparse layer with a copy of its parameters.

        The weight keeps ``module``'s values at the ``round(density * numel)`` active
        positions (drawn as in the constructor) and is zero elsewhere; the bias is
        copied; device, dtype, ``requires_grad`` and train/eval mode are ``module``'s.
        ``module`` itself is not modified. Build the optimizer after converting.
        """
        density = check_density(density)
        layout = cls._check_layout(layout)
        check_generator(generator)
        if not isinstance(module, cls._dense_cls):
            raise TypeError(
                f"module must be an {cls._dense_cls.__module__}.{cls._dense_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        return cls._wrap(module, exact_count(density, math.prod(module.weight.shape)), layout, generator)


class _MaskedSparseLinear(torch.autograd.Function):
    """Mask layout, sparse backend: ``y = x W^T + b`` and ``grad x`` with the CSR kernels
    on the active weights (gathered from the dense weight), ``grad W`` dense, as
    ``F.linear`` computes it (exact sparse momentum grows from all of it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, structure):
        row_ptr, col_idx, col_ptr, row_idx, perm, flat_index = structure
        values = weight.detach().reshape(-1)[flat_index]
        ctx.structure = structure
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        return ops.csr_spmm(x, row_ptr, col_idx, values, None, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        row_ptr, col_idx, col_ptr, row_idx, perm, flat_index = ctx.structure
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.csr_spmm(grad, col_ptr, row_idx, values, perm, None)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, None


class SparseLinear(_MaskLayoutMixin, nn.Linear):
    """``nn.Linear`` whose weight has a fixed number of active (nonzero) entries.

    ``nn.Linear.__init__`` runs first (same parameters, same initialisation, same RNG
    use), then ``round(density * in_features * out_features)`` positions are drawn with
    :func:`sparsemom_ext.sparsity.init.random_mask` from ``generator`` (a CPU
    generator; None: torch's default one) and the others are zeroed. ``density=1.0``
    is exactly ``nn.Linear`` (nothing is drawn). A density so small that it rounds to 0
    weights is allowed: the layer then outputs its bias only.

    ``layout="mask"`` (default): ``weight`` is the dense Parameter and the persistent
    bool buffer ``mask`` is attached to it, so the fused optimizers and the engine
    find it. ``backend`` picks the kernels of its forward/backward (module docstring).

    ``layout="csr"``: ``values`` (the active weights, row-major) is the Parameter and
    the CSR structure is kept in int32 buffers; forward and backward cost O(nnz x batch)
    and no dense weight or weight gradient is ever formed; ``mask`` and
    ``dense_weight()`` are computed on request. ``weight`` does not exist: use
    ``values`` or ``dense_weight()``. ``backend`` is ignored (always sparse).

    :meth:`to_layout` converts between the two, keeping the function identical.
    """

    _dense_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, density: float = 1.0, layout: str = "mask", backend: str = "auto",
                 generator: Optional[torch.Generator] = None):
        # Validated before nn.Linear.__init__, so a bad call draws nothing from the RNG.
        density = check_density(density)
        layout = check_layout(layout)
        backend = check_backend(backend)
        check_generator(generator)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.backend = backend
        self._init_mask(exact_count(density, self.weight.numel()), "mask", generator)
        if layout == "csr":
            self._convert_to_csr()

    @classmethod
    def _from_dense_skeleton(cls, module: nn.Linear) -> "SparseLinear":
        return cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                   dtype=module.weight.dtype)

    # ----------------------------------------------------------------- layouts
    def __getattr__(self, name):
        # Reached only when normal lookup fails: in the csr layout `mask` is computed,
        # and `weight` gets a message that says where the weights are.
        if self.__dict__.get("layout") == "csr":
            if name == "mask":
                return ops.csr_to_mask(self.row_ptr, self.col_idx, self.in_features)
            if name == "weight":
                raise AttributeError(
                    "SparseLinear(layout='csr') has no dense weight Parameter: the active weights "
                    "are .values (with .row_ptr / .col_idx); .dense_weight() builds the dense matrix"
                )
        return super().__getattr__(name)

    def _convert_to_csr(self) -> None:
        mask = self._buffers.pop("mask")
        weight = self._parameters.pop("weight")
        row_ptr, col_idx = ops.csr_from_mask(mask)
        self.layout = "csr"
        self.values = nn.Parameter(ops.csr_values_from_dense(weight.detach(), row_ptr, col_idx),
                                   requires_grad=weight.requires_grad)
        self._set_structure(row_ptr, col_idx)

    def _convert_to_mask(self) -> None:
        weight = self.dense_weight()
        mask = ops.csr_to_mask(self.row_ptr, self.col_idx, self.in_features)
        requires_grad = self.values.requires_grad
        del self._parameters["values"]
        for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
            del self._buffers[name]
        self.layout = "mask"
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)
        self.register_buffer("mask", mask, persistent=True)
        attach_mask(self.weight, self.mask)

    def _set_structure(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        """Install a (validated) CSR structure and its cached transpose."""
        col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, self.in_features)
        self.register_buffer("row_ptr", row_ptr, persistent=True)
        self.register_buffer("col_idx", col_idx, persistent=True)
        for name, t in (("col_ptr", col_ptr), ("row_idx", row_idx), ("perm", perm)):
            self.register_buffer(name, t, persistent=False)

    def to_layout(self, layout: str) -> "SparseLinear":
        """This layer in ``layout`` ("mask" or "csr"): ``self`` when it already is, else a
        new layer with the same active weights, bias, device, dtype and mode, computing
        the same function. Build the optimizer after converting."""
        layout = check_layout(layout)
        if layout == self.layout:
            return self
        new = copy.deepcopy(self)
        if layout == "csr":
            new._convert_to_csr()
        else:
            new._convert_to_mask()
        return new

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def nnz(self) -> int:
        if self.layout == "csr":
            return self.values.numel()
        return super().nnz

    def dense_weight(self) -> torch.Tensor:
        if self.layout == "csr":
            return ops.csr_to_dense(self.values.detach(), self.row_ptr, self.col_idx, self.in_features)
        return super().dense_weight()

    def reset_parameters(self) -> None:
        if self.__dict__.get("layout") != "csr":
            super().reset_parameters()
            return
        # nn.Linear's distribution (kaiming_uniform_ with a=sqrt(5) is U(-1/sqrt(in), 1/sqrt(in))).
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.layout == "csr":
            error = self._prepare_csr_load(state_dict, prefix)
            if error is not None:
                error_msgs.append(error)
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.layout == "csr" and prefix + "row_ptr" in state_dict:
            self._set_structure(self.row_ptr, self.col_idx)

    def _prepare_csr_load(self, state_dict, prefix) -> Optional[str]:
        """Validate an incoming CSR structure (before anything is overwritten) and resize
        ``values`` and the buffers to its nnz, keeping the Parameter object."""
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        if not all(k in state_dict for k in keys):
            return None  # missing keys are reported by the default loader
        values, row_ptr, col_idx = (state_dict[k] for k in keys)
        try:
            if row_ptr.numel() != self.out_features + 1:
                raise ValueError(f"row_ptr must have out_features + 1 = {self.out_features + 1} entries, "
                                 f"got {row_ptr.numel()}")
            if values.shape != col_idx.shape:
                raise ValueError(f"values must have one entry per nonzero ({col_idx.numel()}), "
                                 f"got shape {tuple(values.shape)}")
            ops.csr_transpose(row_ptr, col_idx, self.in_features)  # checks every index
            # The layer keeps a canonical structure (columns strictly increasing in each
            # row), so nnz, mask and the layouts agree.
            if col_idx.numel() > 1:
                row_starts = torch.zeros(col_idx.numel(), dtype=torch.bool, device=col_idx.device)
                row_starts[row_ptr[:-1][row_ptr[:-1] < col_idx.numel()].long()] = True
                if not bool(((col_idx.diff() > 0) | row_starts[1:]).all()):
                    raise ValueError("col_idx must be strictly increasing within each row "
                                     "(sorted, no repeated column)")
        except (ValueError, TypeError, RuntimeError) as exc:
            return f"invalid CSR structure for {prefix or 'the layer'}: {exc}"
        nnz = col_idx.numel()
        if nnz != self.values.numel():
            self.values.data = self.values.data.new_empty(nnz)
            self.col_idx = self.col_idx.new_empty(nnz)
        return None

    # ----------------------------------------------------------------- forward
    def uses_sparse_kernels(self, x: torch.Tensor) -> bool:
        """Whether the forward of ``x`` runs the sparse kernels.

        Always in the csr layout. In the mask layout: ``backend="sparse"`` yes,
        ``"dense"`` no, ``"auto"`` when the sparse forward + input gradient are faster than
        dense, as measured by ``bench/bench_spmm.py`` on CPU: float32 input on CPU, density
        at most ``AUTO_MAX_DENSITY`` and a weight of at least ``AUTO_MIN_NUMEL`` entries
        (smaller layers are too quick for the difference to matter). Elsewhere (CUDA,
        other dtypes) auto stays dense: those kernels are not tuned to beat cuBLAS/MKL yet.
        """
        if self.layout == "csr" or self.backend == "sparse":
            return True
        if self.backend == "dense":
            return False
        numel = self.in_features * self.out_features
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.mask.device.type == "cpu"
                and numel >= self.AUTO_MIN_NUMEL
                and self._mask_structure_nnz() <= self.AUTO_MAX_DENSITY * numel)

    AUTO_MAX_DENSITY = 0.1
    AUTO_MIN_NUMEL = 1 << 16

    def _cached_for_mask(self, name: str, build):
        """``build(mask)``, computed once per mask tensor and version (the engine updates the
        mask in place, which bumps its version counter) and kept in ``__dict__[name]``.

        The entry also holds an alias of the mask it was built from: while it lives, no
        other mask can be allocated at its address, which with a reused address and an
        equal version counter would hit a stale entry.
        """
        mask = self.mask
        key = (mask.data_ptr(), mask._version, mask.device)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = (key, build(mask), mask.detach())
            self.__dict__[name] = cached
        return cached[1]

    def _mask_structure_nnz(self) -> int:
        # Counting the mask costs O(numel): done once per mask version, not per forward.
        return self._cached_for_mask("_mask_nnz_cache", lambda mask: int(mask.count_nonzero()))

    def _mask_structure(self):
        """CSR structure of the mask and each nonzero's flat index, per mask version."""
        def build(mask):
            row_ptr, col_idx = ops.csr_from_mask(mask)
            col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, self.in_features)
            flat_index = mask.reshape(-1).nonzero().reshape(-1)
            return (row_ptr, col_idx, col_ptr, row_idx, perm, flat_index)
        return self._cached_for_mask("_mask_structure_cache", build)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.uses_sparse_kernels(input):
            return F.linear(input, self.weight, self.bias)
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(f"input must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(input.shape)}")
        dtype = self.values.dtype if self.layout == "csr" else self.weight.dtype
        if input.dtype != dtype:
            raise TypeError(f"input must have the layer's dtype {dtype}, got {input.dtype}")
        if self.layout == "csr":
            return ops.csr_linear(input, self.values, self.bias, self.row_ptr, self.col_idx,
                                  self.col_ptr, self.row_idx, self.perm)
        lead = input.shape[:-1]
        y = _MaskedSparseLinear.apply(input.reshape(-1, self.in_features), self.weight, self.bias,
                                      self._mask_structure())
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        backend = f", backend={self.backend}" if self.layout == "mask" and self.backend != "auto" else ""
        return super().extra_repr() + backend


class SparseConv2d(_MaskLayoutMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight has a fixed number of active (nonzero) entries.

    Takes every ``nn.Conv2d`` argument (stride, padding incl. ``"same"``/``"valid"``,
    dilation, groups, bias, padding_mode, device, dtype) plus keyword-only
    ``density``, ``layout`` and ``generator``, and behaves like :class:`SparseLinear`:
    ``round(density * weight.numel())`` active positions of the
    ``(out_channels, in_channels // groups, kh, kw)`` weight, a persistent bool
    ``mask`` buffer attached to ``weight``, ``nn.Conv2d``'s own forward.
    """

    _dense_cls = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[str, int, tuple] = 0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None,
                 *, density: float = 1.0, layout: str = "mask", generator: Optional[torch.Generator] = None):
        density = check_density(density)
        layout = self._check_layout(layout)
        check_generator(generator)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_mask(exact_count(density, self.weight.numel()), layout, generator)

    @classmethod
    def _check_layout(cls, layout) -> str:
        if check_layout(layout) != "mask":
            raise ValueError(f"SparseConv2d supports layout='mask' only, got layout={layout!r} "
                             "(the csr layout is SparseLinear's)")
        return layout

    @classmethod
    def _from_dense_skeleton(cls, module: nn.Conv2d) -> "SparseConv2d":
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                   module.padding, module.dilation, module.groups, module.bias is not None,
                   module.padding_mode, device="meta", dtype=module.weight.dtype)
