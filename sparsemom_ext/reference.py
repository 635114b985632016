"""Pure-PyTorch semantics of every ``torch.ops.sparsemom`` operator: the test oracle.

Each function has the signature of the op in :mod:`sparsemom_ext.ops` and computes
the same result with plain tensor operations, written for clarity, not speed. The
fused optimizer steps follow torch.optim's single-tensor SGD / Adam arithmetic in
"opmath" precision (float32 for float16/bfloat16/float32 inputs, float64 for
float64), rounding to the storage dtype where a tensor is stored (optimizer state,
the parameter); other intermediates stay in opmath.
"""

import math
from typing import Optional

import torch
from torch import Tensor


def _opmath(t: Tensor) -> Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _store(target: Tensor, value: Tensor) -> Tensor:
    """Write ``value`` into ``target`` (rounding to its dtype); return the rounded value in opmath."""
    target.copy_(value)
    return _opmath(target)


def mask_apply_(weight: Tensor, mask: Tensor) -> None:
    weight.masked_fill_(~mask, 0)


def fused_sgd_step_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None, *, lr: float, momentum: float = 0.0,
                    dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                    maximize: bool = False, init_momentum_buffer: bool = False) -> None:
    p = _opmath(param)
    g = _opmath(grad)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum_buffer is not None and momentum != 0:
        if init_momentum_buffer:
            buf = _store(momentum_buffer, g)
        else:
            buf = _store(momentum_buffer, _opmath(momentum_buffer) * momentum + (1 - dampening) * g)
        g = g + momentum * buf if nesterov else buf
    p = p - lr * g
    param.copy_(p)
    if mask is not None:
        mask_apply_(param, mask)


def fused_adam_step_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                     max_exp_avg_sq: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                     step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                     eps: float = 1e-8, weight_decay: float = 0.0,
                     decoupled_weight_decay: bool = False, maximize: bool = False) -> None:
    p = _opmath(param)
    g = _opmath(grad)
    if maximize:
        g = -g
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
    m = _store(exp_avg, torch.lerp(_opmath(exp_avg), g, 1 - beta1))
    v = _store(exp_avg_sq, _opmath(exp_avg_sq) * beta2 + (1 - beta2) * g * g)
    if max_exp_avg_sq is not None:
        v = _store(max_exp_avg_sq, torch.maximum(_opmath(max_exp_avg_sq), v))
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = v.sqrt() / bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)
    param.copy_(p)
    if mask is not None:
        mask_apply_(param, mask)
