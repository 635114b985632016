"""SparseLinear and SparseConv2d: drop-in nn.Linear / nn.Conv2d with a weight mask.

Layout ``"mask"`` (the only one today) keeps ``weight`` as the dense Parameter of the
torch layer and adds a persistent bool buffer ``mask``: the state_dict is nn.Linear's /
nn.Conv2d's plus ``mask``. The weight is kept exactly zero at inactive positions by
whoever changes it: the layer itself (construction, ``load_state_dict``), the fused
optimizers of :mod:`sparsemom_ext.optim` (they find the mask attached to the weight
with :func:`sparsemom_ext.mask_of`) and the sparse-training engine. With a plain
``torch.optim`` optimizer call ``sparsemom_ext.mask_apply_(layer.weight.data,
layer.mask)`` after each step, or inactive weights drift away from zero.

The forward pass is the torch layer's own (``F.linear`` / ``nn.Conv2d.forward``): no
masking at run time, so at ``density=1.0`` the layers are exactly their torch parents.
"""

import math
from typing import Optional, Union

import torch
from torch import nn

from ..ops import mask_apply_
from ..sparsity import attach_mask
from ..sparsity.init import check_density, exact_count, random_mask, check_generator

__all__ = ["LAYOUTS", "SparseConv2d", "SparseLinear"]

LAYOUTS = ("mask",)
_PLANNED_LAYOUTS = ("csr",)
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_layout(layout) -> str:
    """``layout`` if it is implemented, else a ValueError listing the valid layouts."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {', '.join(repr(l) for l in LAYOUTS)}, got {layout!r} "
            f"({', '.join(repr(l) for l in _PLANNED_LAYOUTS)} is planned, not implemented yet)"
        )
    return layout


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
        self._reattach_mask()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
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

    @property
    def nnz(self) -> int:
        """The number of active weights (True entries of ``mask``)."""
        return int(self.mask.count_nonzero())

    @property
    def density(self) -> float:
        """The current fraction of active weights, ``nnz / numel`` (0.0 for a weight with no entries)."""
        numel = self.mask.numel()
        return self.nnz / numel if numel else 0.0

    def dense_weight(self) -> torch.Tensor:
        """A new tensor: the weight with exact zeros at inactive positions, detached."""
        return self.weight.detach().masked_fill(~self.mask, 0)

    def extra_repr(self) -> str:
        density = "?" if self.mask.is_meta else f"{self.density:.4g}"
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
        new = cls._from_dense_skeleton(module, layout)
        new.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        new.train(module.training)
        new._init_mask(count, layout, generator)
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
        layout = check_layout(layout)
        check_generator(generator)
        if not isinstance(module, cls._dense_cls):
            raise TypeError(
                f"module must be an {cls._dense_cls.__module__}.{cls._dense_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        return cls._wrap(module, exact_count(density, math.prod(module.weight.shape)), layout, generator)


class SparseLinear(_MaskLayoutMixin, nn.Linear):
    """``nn.Linear`` whose weight has a fixed number of active (nonzero) entries.

    ``nn.Linear.__init__`` runs first (same parameters, same initialisation, same RNG
    use), then ``round(density * in_features * out_features)`` positions are drawn with
    :func:`sparsemom_ext.sparsity.init.random_mask` from ``generator`` (a CPU
    generator; None: torch's default one), the others are zeroed, and the mask is
    stored as the persistent bool buffer ``mask`` and attached to ``weight`` so the
    fused optimizers and the engine find it. ``density=1.0`` is exactly ``nn.Linear``
    (nothing is drawn). A density so small that it rounds to 0 weights is allowed: the
    layer then outputs its bias only (the engine may grow weights into it later).

    Only ``layout="mask"`` exists today (a dense weight plus the mask); ``"csr"`` is
    planned. See the module docstring for keeping the weight masked during training.
    """

    _dense_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, density: float = 1.0, layout: str = "mask", generator: Optional[torch.Generator] = None):
        # Validated before nn.Linear.__init__, so a bad call draws nothing from the RNG.
        density = check_density(density)
        layout = check_layout(layout)
        check_generator(generator)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_mask(exact_count(density, self.weight.numel()), layout, generator)

    @classmethod
    def _from_dense_skeleton(cls, module: nn.Linear, layout: str) -> "SparseLinear":
        return cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                   dtype=module.weight.dtype, layout=layout)


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
        layout = check_layout(layout)
        check_generator(generator)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_mask(exact_count(density, self.weight.numel()), layout, generator)

    @classmethod
    def _from_dense_skeleton(cls, module: nn.Conv2d, layout: str) -> "SparseConv2d":
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                   module.padding, module.dilation, module.groups, module.bias is not None,
                   module.padding_mode, device="meta", dtype=module.weight.dtype, layout=layout)
