"""Keeping activations batch innermost between csr convolutions.

A :class:`~sparsemom_ext.nn.CsrConv2d` computes with its activations batch innermost: an
``(n, c, h, w)`` tensor stored ``(c, h, w, n)``. By default it makes its output contiguous
(a transpose), because torch's CPU batch norm and pooling take a slow strided path on
that layout. The modules here are torch's, subclassed, that read the layout without a
copy and hand it on, so a stack of csr conv, batch norm, ReLU and pooling runs without a
transpose between the convs:

- :class:`BatchNorm2d`: the statistics of channel ``c`` are over all its ``n * h * w``
  values, which in this layout are one contiguous run: the normalisation is torch's
  batch-norm kernel on the ``(1, c, h * w * n, 1)`` view (the same statistics, running
  averages and parameters; sums in another order), writing into an output made in the
  layout. That output is not a view, so what models do in place after a batch norm
  (``nn.ReLU(inplace=True)``, ``out += identity``) stays cheap: on a view autograd copies
  the gradient to contiguous order and back (``CopySlices``), which made the ReLU
  backward of a 64-channel csr conv stack 17x slower (190 against 11 ms);
- :class:`MaxPool2d`, :class:`AvgPool2d`, :class:`AdaptiveAvgPool2d`: ``(c, n, h, w)`` is
  channels-last ``(n, c, h, w)`` memory read with batch and channels swapped, so torch's
  channels-last pooling kernel (vectorised over the batch here) pools it in place.

Each computes exactly what its torch base computes for any other input. :func:`keep_batch_innermost`
turns a model's csr convs to ``output_layout="batch_innermost"`` and swaps these in.
"""

from typing import Dict, Type

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .csr_layout import CsrConv2d

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "MaxPool2d", "is_batch_innermost",
           "keep_batch_innermost"]


def is_batch_innermost(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D ``(n, c, h, w)`` tensor stored ``(c, h, w, n)`` (and not also
    contiguous, as when ``n == 1``)."""
    return x.dim() == 4 and not x.is_contiguous() and x.permute(1, 2, 3, 0).is_contiguous()


class _BatchNormColumns(torch.autograd.Function):
    """Batch norm of a batch-innermost ``(n, c, h, w)`` input by torch's kernels on its
    ``(1, c, h * w * n, 1)`` view, into an output allocated batch innermost (not a view:
    in-place ops on it need no ``CopySlices``). Once differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
        n, c, h, w = input.shape
        columns = input.permute(1, 2, 3, 0).reshape(1, c, h * w * n, 1)
        out = torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device=input.device)
        mean, invstd = input.new_empty((0,)), input.new_empty((0,))  # sized by the kernel (empty in eval)
        torch.ops.aten.native_batch_norm.out(columns, weight, bias, running_mean, running_var, training, momentum,
                                             eps, out=out.permute(1, 2, 3, 0).view(1, c, h * w * n, 1),
                                             save_mean=mean, save_invstd=invstd)
        ctx.save_for_backward(columns, weight, running_mean, running_var, mean, invstd)
        ctx.training, ctx.eps = training, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        columns, weight, running_mean, running_var, mean, invstd = ctx.saved_tensors
        n, c, h, w = grad.shape
        grad_columns = grad.permute(1, 2, 3, 0).reshape(1, c, h * w * n, 1)  # a copy only if not batch innermost
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_columns, columns, weight, running_mean, running_var, mean, invstd, ctx.training, ctx.eps,
            list(ctx.needs_input_grad[:3]))
        if grad_input is not None:
            grad_input = grad_input.view(c, h, w, n).permute(3, 0, 1, 2)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises a batch-innermost input without a copy and returns
    it batch innermost, not as a view (module docstring); any other input goes to
    ``nn.BatchNorm2d``. The fast path is once differentiable (no double backward)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not is_batch_innermost(input):
            return super().forward(input)
        self._check_input_dim(input)
        # torch's _BatchNorm.forward, the same choices: the running-average factor and
        # whether batch statistics normalise.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return _BatchNormColumns.apply(input, self.weight, self.bias, self.running_mean if keep_stats else None,
                                       self.running_var if keep_stats else None, use_batch_stats, factor, self.eps)


class _SwappedPool:
    """Mixin: a torch pooling module whose batch-innermost input is pooled as channels-last
    memory with batch and channels swapped."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not is_batch_innermost(input):
            return super().forward(input)
        out = super().forward(input.transpose(0, 1))
        if isinstance(out, tuple):  # MaxPool2d(return_indices=True): indices are per (n, c) plane
            return tuple(t.transpose(0, 1) for t in out)
        return out.transpose(0, 1)


class MaxPool2d(_SwappedPool, nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a batch-innermost input in place (module docstring)."""


class AvgPool2d(_SwappedPool, nn.AvgPool2d):
    """``nn.AvgPool2d`` that pools a batch-innermost input in place (module docstring)."""


class AdaptiveAvgPool2d(_SwappedPool, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that pools a batch-innermost input in place (module docstring)."""


_SWAPS: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.BatchNorm2d: BatchNorm2d, nn.MaxPool2d: MaxPool2d, nn.AvgPool2d: AvgPool2d,
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2d,
}


def keep_batch_innermost(model: nn.Module) -> nn.Module:
    """Keep ``model``'s activations batch innermost from its csr convs on, in place.

    Every :class:`~sparsemom_ext.nn.CsrConv2d` gets ``output_layout="batch_innermost"``,
    and every module that is exactly an ``nn.BatchNorm2d``, ``nn.MaxPool2d``,
    ``nn.AvgPool2d`` or ``nn.AdaptiveAvgPool2d`` becomes this module's subclass of it (the
    same object state: parameters, buffers, options, hooks and train/eval mode), which
    reads that layout without a copy. Elementwise ops keep the layout; a layer not listed
    here computes correctly on it, at torch's speed for strided input. ``x.view(n, -1)``
    on such an activation raises (its memory is not batch-major): use ``x.flatten(1)`` or
    ``x.reshape(n, -1)``. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, CsrConv2d):
            module.output_layout = "batch_innermost"
        swapped = _SWAPS.get(type(module))
        if swapped is not None:
            module.__class__ = swapped  # a subclass adding no state: the module stays the same object
    return model
