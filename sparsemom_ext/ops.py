"""Typed wrappers of the ``torch.ops.sparsemom`` operators, and their fake kernels.

Every operator validates its arguments in C++ (one implementation for CPU and CUDA)
and raises ``ValueError`` / ``TypeError`` naming the argument before writing
anything. The pure-PyTorch semantics of each op are in :mod:`sparsemom_ext.reference`.
All ops here are deterministic on CPU and CUDA: the elementwise ops use no atomics,
and the selection ops (:func:`magnitude_prune`, :func:`momentum_grow`,
:func:`set_prune`) use atomics only to count (on CUDA) and break every tie by flat
index, so their result never depends on thread count, block scheduling or the device.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "fused_adam_step_",
    "fused_sgd_step_",
    "magnitude_prune",
    "mask_apply_",
    "momentum_grow",
    "set_prune",
]


def mask_apply_(weight: Tensor, mask: Tensor) -> None:
    """Zero ``weight`` in place where the bool ``mask`` is False.

    Inactive positions become exactly ``+0`` (even when they held NaN or inf).
    ``mask`` must have the shape and device of ``weight``; ``weight`` must be
    float32, float64, float16 or bfloat16. Either may be non-contiguous.
    """
    torch.ops.sparsemom.mask_apply_(weight, mask)


def fused_sgd_step_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_momentum_buffer: bool = False,
) -> None:
    """One SGD step of ``torch.optim.SGD`` fused with ``mask_apply_``, in one pass.

    Updates ``param`` (and ``momentum_buffer`` when ``momentum != 0``; without
    momentum the buffer may be None and is ignored) in place with
    the arithmetic of torch.optim's single-tensor SGD, then zeros ``param`` where
    ``mask`` is False. The momentum of inactive positions is updated like any other
    (sparse momentum grows weights from it). ``init_momentum_buffer=True`` is the
    first step of a fresh buffer: it is set to the gradient (after weight decay),
    as torch.optim does; the buffer's old contents are then ignored.

    Arithmetic is done in float32 for float16/bfloat16/float32 and float64 for
    float64, rounding to the storage dtype where torch.optim stores a tensor.
    """
    torch.ops.sparsemom.fused_sgd_step_(
        param, grad, momentum_buffer, mask, lr, momentum, dampening, weight_decay,
        nesterov, maximize, init_momentum_buffer,
    )


def fused_adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """One Adam (or AdamW, ``decoupled_weight_decay=True``) step fused with ``mask_apply_``.

    Same arithmetic as torch.optim's single-tensor Adam with bias correction;
    ``step`` is the step count after this step's increment (1 on the first step).
    ``max_exp_avg_sq`` given means amsgrad. Moments of inactive positions are updated
    like any other; ``param`` is zeroed where ``mask`` is False.
    """
    torch.ops.sparsemom.fused_adam_step_(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, mask, lr, beta1, beta2, eps,
        weight_decay, decoupled_weight_decay, maximize, step,
    )


_SELECTION_RULES = """
    Order: by ``|x|``, compared as the bits of ``|x|`` (sign bit cleared) read as an
    unsigned integer of the dtype's width, which is monotone in ``|x|`` and puts NaN
    above +inf. Ties (equal keys, e.g. repeated values, ``0.0`` and ``-0.0``) are
    broken by lower flat index (row-major position) first, identically on CPU and
    CUDA. The result is exact (``k`` positions change, never more or fewer) and
    deterministic: it does not depend on the thread count or the GPU's scheduling.
    The selection runs in O(numel) (radix select on the integer keys, no sort).

    ``mask`` is a bool tensor of the shape and device of the values (any nonzero byte
    counts as active, as in :func:`mask_apply_`); either may be non-contiguous. The values are float32, float64, float16 or bfloat16. Nothing is
    modified: the result is a new contiguous bool tensor of ``mask``'s shape.
    ``k`` must be in ``[0, available]``; otherwise ``ValueError`` naming ``k`` and the
    number available. Empty tensors and ``k == 0`` are fine.
"""


def magnitude_prune(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    """The mask with the ``k`` active positions of smallest ``|weight|`` removed.

    ``k`` may be at most the number of active positions of ``mask``.
    """
    return torch.ops.sparsemom.magnitude_prune(weight, mask, k)


def momentum_grow(score: Tensor, mask: Tensor, k: int) -> Tensor:
    """The mask with the ``k`` inactive positions of largest ``|score|`` added.

    ``score`` is any growth signal: the momentum (sparse momentum), the dense gradient
    (RigL), ... An active position is never picked; ``k`` may be at most the number of
    inactive positions of ``mask``. NaN counts as the largest score.
    """
    return torch.ops.sparsemom.momentum_grow(score, mask, k)


def set_prune(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    """SET pruning done correctly: the mask with ``k`` active weights closest to zero
    removed, half on each side of zero.

    ``ceil(k / 2)`` are removed among the active weights on the ``>= 0`` side (the
    smallest ones) and ``floor(k / 2)`` among the active weights on the ``< 0`` side
    (the largest ones, i.e. closest to zero). When one side has fewer active weights
    than its share, the remainder is taken from the other side. Zeros (``0.0`` and
    ``-0.0``) count as the ``>= 0`` side; NaN goes by its sign bit and, being
    farthest from zero, is removed last on its side. ``k`` may be at most the number
    of active positions of ``mask``.
    """
    return torch.ops.sparsemom.set_prune(weight, mask, k)


for _fn in (magnitude_prune, momentum_grow, set_prune):
    if _fn.__doc__ is not None:  # None under python -OO
        _fn.__doc__ += _SELECTION_RULES


# Fake (meta) kernels: shape/dtype/device agreement, as the C++ kernels check, so
# torch.compile and FakeTensor tracing reject the same calls. Values (lr ranges and
# the like) are only known at run time and are checked by the C++ kernels.
def _check_like(t: Optional[Tensor], name: str, ref: Tensor, same_dtype: bool = True) -> None:
    if t is None:
        return
    torch._check(t.shape == ref.shape, lambda: f"{name} must have the shape of param {tuple(ref.shape)}, got {tuple(t.shape)}")
    torch._check(t.device == ref.device, lambda: f"{name} must be on the device of param ({ref.device}), got {t.device}")
    if same_dtype:
        torch._check(t.dtype == ref.dtype, lambda: f"{name} must have the dtype of param ({ref.dtype}), got {t.dtype}")


def _check_mask(mask: Optional[Tensor], ref: Tensor) -> None:
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor, got {mask.dtype}")
        _check_like(mask, "mask", ref, same_dtype=False)


@torch.library.register_fake("sparsemom::mask_apply_")
def _mask_apply_fake(weight, mask):
    _check_mask(mask, weight)


@torch.library.register_fake("sparsemom::fused_sgd_step_")
def _fused_sgd_step_fake(param, grad, momentum_buffer, mask, lr, momentum, dampening,
                         weight_decay, nesterov, maximize, init_momentum_buffer):
    _check_like(grad, "grad", param)
    _check_like(momentum_buffer, "momentum_buffer", param)
    _check_mask(mask, param)


@torch.library.register_fake("sparsemom::fused_adam_step_")
def _fused_adam_step_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, mask, lr, beta1,
                          beta2, eps, weight_decay, decoupled_weight_decay, maximize, step):
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("max_exp_avg_sq", max_exp_avg_sq)):
        _check_like(t, name, param)
    _check_mask(mask, param)


def _selection_fake(values: Tensor, values_name: str, mask: Tensor, k: int) -> Tensor:
    torch._check(values.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"{values_name} must be float32, float64, float16 or bfloat16, got {values.dtype}")
    torch._check(mask.dtype == torch.bool, lambda: f"mask must be a bool tensor, got {mask.dtype}")
    torch._check(mask.shape == values.shape,
                 lambda: f"mask must have the shape of {values_name} {tuple(values.shape)}, got {tuple(mask.shape)}")
    torch._check(mask.device == values.device,
                 lambda: f"mask must be on the device of {values_name} ({values.device}), got {mask.device}")
    torch._check(k >= 0, lambda: f"k must be >= 0, got k={k}")
    return torch.empty(mask.shape, dtype=torch.bool, device=mask.device)


@torch.library.register_fake("sparsemom::magnitude_prune")
def _magnitude_prune_fake(weight, mask, k):
    return _selection_fake(weight, "weight", mask, k)


@torch.library.register_fake("sparsemom::momentum_grow")
def _momentum_grow_fake(score, mask, k):
    return _selection_fake(score, "score", mask, k)


@torch.library.register_fake("sparsemom::set_prune")
def _set_prune_fake(weight, mask, k):
    return _selection_fake(weight, "weight", mask, k)
