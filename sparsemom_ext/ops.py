"""Typed wrappers of the ``torch.ops.sparsemom`` operators, and their fake kernels.

Every operator validates its arguments in C++ (one implementation for CPU and CUDA)
and raises ``ValueError`` / ``TypeError`` naming the argument before writing
anything. The pure-PyTorch semantics of each op are in :mod:`sparsemom_ext.reference`.
All ops here are deterministic on CPU and CUDA: the elementwise ops use no atomics,
and the selection ops (:func:`magnitude_prune`, :func:`momentum_grow`,
:func:`set_prune`) use atomics only to count (on CUDA) and break every tie by flat
index, so their result never depends on thread count, block scheduling or the device.

The sparse matmul ops (:func:`csr_spmm`, :func:`csr_sddmm`, :func:`csr_linear`) are
deterministic on CPU: every output element is summed by one thread in a fixed order.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

# The structure conversions (torch ops, used when a structure is built or changes) live
# with the other CSR structure rules; they are part of this module's API too.
from .csr_structure import csr_from_mask, csr_to_dense, csr_to_mask, csr_values_from_dense  # noqa: E402,F401
from . import reference

__all__ = [
    "contiguous_from_batch_innermost",
    "conv_output_size",
    "csr_conv2d",
    "csr_conv2d_weight_grad",
    "csr_from_mask",
    "csr_linear",
    "csr_sddmm",
    "csr_spmm",
    "csr_to_dense",
    "csr_to_mask",
    "csr_transpose",
    "csr_values_from_dense",
    "fused_adam_step_",
    "fused_sgd_step_",
    "magnitude_prune",
    "mask_apply_",
    "mask_matches_csr",
    "masked_linear",
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


def mask_matches_csr(mask: Tensor, row_ptr: Tensor, col_idx: Tensor) -> bool:
    """Whether the 2-D bool ``mask`` is True exactly at the positions of the canonical CSR
    structure ``(row_ptr, col_idx)`` (int32; columns strictly increasing within each row)
    of its shape.

    One pass over the mask: what a cache of a mask's structure reads before reusing it,
    since writes through ``.data``, numpy or DLPack leave the mask's version counter as it
    was. A malformed structure is a ValueError naming the argument. CUDA tensors take
    the reference's torch ops (one host sync).
    """
    if isinstance(mask, Tensor) and mask.is_cuda:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
        return reference.mask_matches_csr(mask, row_ptr, col_idx)
    return torch.ops.sparsemom.mask_matches_csr(mask, row_ptr, col_idx)


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


# --------------------------------------------------------------------------- sparse matmul
_CSR_RULES = """
    A CSR structure is ``row_ptr`` (int32, ``n_rows + 1`` entries, starting at 0,
    non-decreasing, ending at nnz) and ``col_idx`` (int32, nnz entries in
    ``[0, n_cols)``), on the device of the dense operands; violations raise
    ``ValueError`` naming the argument. Column indices need not be sorted within a row;
    repeated ones add up. Dense operands are ``(batch, features)`` of any strides and
    of one float dtype (float32, float64, float16, bfloat16); float16/bfloat16 are
    accumulated in float32. Results that are matrices are ``(batch, n_rows)`` tensors
    stored feature-major (strides ``(1, batch)``, i.e. the transpose of a contiguous
    ``(n_rows, batch)`` tensor): the layout the kernels read, so a chain of sparse layers
    never transposes. Call ``.contiguous()`` where a row-major result is needed.
"""


def _check_no_grad_wanted(op: str, **tensors: Optional[Tensor]) -> None:
    """The sparse matmul kernels have no backward of their own: an input that wants a gradient
    would get none (backward leaves its ``.grad`` None), so it is refused."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but {op} has no backward: use csr_linear (autograd for x, "
                             f"values and bias), or call {op} under torch.no_grad() or on {name}.detach()")


def csr_spmm(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
             value_perm: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for ``W`` (``n_rows x x.shape[1]``) in CSR: ``(batch, n_rows)``.

    Nonzero ``k`` of the structure is ``values[k]``, or ``values[value_perm[k]]`` when
    ``value_perm`` is given: with the transposed structure of :func:`csr_transpose`
    this multiplies by ``W.T`` (``dy @ W``) reading the CSR values in place. No autograd:
    ``ValueError`` when ``x``, ``values`` or ``bias`` requires grad (use :func:`csr_linear`).
    """
    _check_no_grad_wanted("csr_spmm", x=x, values=values, bias=bias)
    return torch.ops.sparsemom.csr_spmm(x, row_ptr, col_idx, values, value_perm, bias)


def csr_sddmm(a: Tensor, b: Tensor, row_ptr: Tensor, col_idx: Tensor) -> Tensor:
    """``(a.T @ b)`` sampled at the structure's nonzeros: a new contiguous ``(nnz,)`` tensor.

    ``out[k] = sum_i a[i, row(k)] * b[i, col_idx[k]]`` with ``a`` ``(batch, n_rows)``
    and ``b`` ``(batch, n_cols)``: the gradient of the values of ``y = x @ W.T`` is
    ``csr_sddmm(grad_y, x, row_ptr, col_idx)``. Nothing of size ``n_rows x n_cols`` is formed.
    No autograd: ``ValueError`` when ``a`` or ``b`` requires grad.
    """
    _check_no_grad_wanted("csr_sddmm", a=a, b=b)
    return torch.ops.sparsemom.csr_sddmm(a, b, row_ptr, col_idx)


def csr_transpose(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The transposed (CSC) structure ``(col_ptr, row_idx, perm)``, all int32.

    ``col_ptr`` has ``n_cols + 1`` entries; within a column the rows are increasing;
    ``perm[j]`` is the CSR position of CSC position ``j``, so ``values[perm]`` are the
    values in CSC order. Built in O(nnz + n_cols) by a counting sort; cache it for as
    long as the structure does not change. (On CUDA: a stable device sort and a binary
    search, O(nnz log nnz), no host synchronisation.)
    """
    return torch.ops.sparsemom.csr_transpose(row_ptr, col_idx, n_cols)


def csr_linear_backward(grad: Tensor, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                        col_ptr: Tensor, row_idx: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor]:
    """Both gradients of ``y = x @ W.T`` from the output gradient ``grad``: ``(grad_x, grad_values)``.

    The same as ``(csr_spmm(grad, col_ptr, row_idx, values, perm), csr_sddmm(grad, x, row_ptr,
    col_idx))``, with ``(col_ptr, row_idx, perm) = csr_transpose(row_ptr, col_idx, in_features)``;
    what :func:`csr_linear`'s backward calls when both are wanted. On the CPU (float32) it is one
    pass over the transposed structure: each nonzero reads its row of ``grad`` once for both
    products instead of once per kernel, and the results are bit-identical to the two ops'.
    That pass reads ``values`` and writes ``grad_values`` through ``perm`` and does not read
    ``col_idx``, so it validates the transposed structure's content (``col_ptr``, and
    ``row_idx`` and ``perm`` in range, ``perm`` a permutation), not ``col_idx``'s; that the two
    structures agree is the caller's to keep (as for :func:`csr_linear`): pass what
    :func:`csr_transpose` returned. ``grad_x`` is ``(batch, in_features)``
    feature-major, ``grad_values`` has one entry per entry of ``values`` in CSR order:
    ``values`` may have idle slots past nnz (as :func:`csr_linear`'s), whose gradient is 0.
    No autograd (it is a backward): ``ValueError`` when ``grad``, ``x`` or ``values`` requires grad.
    """
    _check_no_grad_wanted("csr_linear_backward", grad=grad, x=x, values=values)
    return torch.ops.sparsemom.csr_linear_backward(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm)


@torch.library.register_fake("sparsemom::transpose_contiguous")
def _transpose_contiguous_fake(x):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got shape {tuple(x.shape)}")
    return x.new_empty((x.shape[1], x.shape[0]))


def csr_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], row_ptr: Tensor, col_idx: Tensor,
               col_ptr: Tensor, row_idx: Tensor, perm: Tensor) -> Tensor:
    """``x @ W.T + bias`` (``x``: ``(*, in_features)``) with autograd for ``x``, ``values``, ``bias``.

    ``(col_ptr, row_idx, perm)`` is ``csr_transpose(row_ptr, col_idx, in_features)``:
    the gradient of ``x`` is :func:`csr_spmm` on it, the gradient of ``values``
    :func:`csr_sddmm`. ``perm`` must be a permutation of ``[0, nnz)`` (ValueError before the
    forward otherwise; checked once per perm buffer until it is written to). Leading dimensions of ``x`` are flattened into the batch; the result
    is ``(*, n_rows)``, feature-major in memory. ``values`` may have idle slots past the
    structure's nnz (a :class:`~sparsemom_ext.nn.CsrLinear`'s fixed capacity): they are
    not read and their gradient is 0. The op makes ``x`` feature-major once
    (``transpose_contiguous``; nothing when it already is, as a csr layer's output is)
    for the forward and the backward's SDDMM, and hands the gradient of ``x`` back in
    ``x``'s own layout.

    Under ``torch.autocast`` it is cast like ``F.linear``: ``x``, ``values`` and ``bias``
    (float32/16, bfloat16) go to the autocast dtype, the kernels accumulate in float32 and
    the result (and the gradient of ``values``, cast back by autograd) follows. There is no
    double backward: a backward with ``create_graph=True`` raises.
    """
    lead = x.shape[:-1]
    x, values, bias = _autocast_like_linear(x, values, bias)
    y = torch.ops.sparsemom.csr_linear(x.reshape(-1, x.shape[-1]), values, bias, row_ptr, col_idx, col_ptr,
                                       row_idx, perm)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_like_linear(*tensors: Optional[Tensor]):
    """``tensors`` cast to the autocast dtype of their device when autocast is on there, as
    autocast casts ``F.linear``'s operands (float64 and non-float tensors stay as they are)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors)


def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], row_ptr: Tensor, col_idx: Tensor,
                  col_ptr: Tensor, row_idx: Tensor, perm: Tensor, flat_index: Tensor) -> Tensor:
    """``x @ weight.T + bias`` for a dense ``weight`` that is zero off its mask, with the sparse kernels.

    ``(row_ptr, col_idx)`` is the mask's structure (:func:`csr_from_mask`), ``(col_ptr,
    row_idx, perm)`` its transpose and ``flat_index`` the int64 flat index of each nonzero
    in CSR order (``mask.reshape(-1).nonzero().reshape(-1)``). The forward and the
    gradient of ``x`` run :func:`csr_spmm` on the active weights; the gradient of
    ``weight`` is dense, ``grad.T @ x`` as ``F.linear``'s (exact sparse momentum grows
    from the momentum of every inactive weight). Autograd for ``x``, ``weight`` and
    ``bias``, in C++. Leading dimensions of ``x`` are flattened into the batch. Autocast
    and double backward: as :func:`csr_linear`.
    """
    lead = x.shape[:-1]
    x, weight, bias = _autocast_like_linear(x, weight, bias)
    y = torch.ops.sparsemom.masked_linear(x.reshape(-1, x.shape[-1]), weight, bias, row_ptr, col_idx, col_ptr,
                                          row_idx, perm, flat_index)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


for _fn in (csr_spmm, csr_sddmm, csr_transpose, csr_linear, masked_linear, csr_linear_backward):
    if _fn.__doc__ is not None:
        _fn.__doc__ += _CSR_RULES


def _csr_fake_checks(row_ptr: Tensor, col_idx: Tensor) -> None:
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        torch._check(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}")
        torch._check(t.dim() == 1, lambda: f"{name} must be 1-D, got shape {tuple(t.shape)}")


@torch.library.register_fake("sparsemom::csr_spmm")
def _csr_spmm_fake(x, row_ptr, col_idx, values, value_perm, bias):
    _csr_fake_checks(row_ptr, col_idx)
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (batch, features), got shape {tuple(x.shape)}")
    torch._check(values.dtype == x.dtype, lambda: f"values must have the dtype of x ({x.dtype}), got {values.dtype}")
    torch._check(values.shape == col_idx.shape,
                 lambda: f"values must have one entry per nonzero ({col_idx.numel()}), got {values.numel()}")
    return x.new_empty((row_ptr.shape[0] - 1, x.shape[0])).t()


@torch.library.register_fake("sparsemom::csr_sddmm")
def _csr_sddmm_fake(a, b, row_ptr, col_idx):
    _csr_fake_checks(row_ptr, col_idx)
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "a and b must be 2-D (batch, features)")
    torch._check(b.dtype == a.dtype, lambda: f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    torch._check(a.shape[0] == b.shape[0], lambda: f"b must have the batch size of a ({a.shape[0]}), got {b.shape[0]}")
    torch._check(a.shape[1] == row_ptr.shape[0] - 1,
                 lambda: f"a must have n_rows = {row_ptr.shape[0] - 1} columns, got shape {tuple(a.shape)}")
    return a.new_empty(col_idx.shape)


@torch.library.register_fake("sparsemom::csr_transpose")
def _csr_transpose_fake(row_ptr, col_idx, n_cols):
    _csr_fake_checks(row_ptr, col_idx)
    torch._check(n_cols >= 0, lambda: f"n_cols must be >= 0, got {n_cols}")
    return (row_ptr.new_empty((n_cols + 1,)), col_idx.new_empty(col_idx.shape),
            col_idx.new_empty(col_idx.shape))


def _check_slots(values, col_idx):
    torch._check(values.dim() == 1 and values.shape[0] >= col_idx.shape[0],
                 lambda: f"values must be 1-D with one entry per nonzero ({col_idx.numel()}) and possibly idle "
                         f"slots after them, got shape {tuple(values.shape)}")


@torch.library.register_fake("sparsemom::csr_linear")
def _csr_linear_fake(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm):
    _check_slots(values, col_idx)
    return _csr_spmm_fake(x, row_ptr, col_idx, values.new_empty(col_idx.shape), None, bias)


@torch.library.register_fake("sparsemom::masked_linear")
def _masked_linear_fake(x, weight, bias, row_ptr, col_idx, col_ptr, row_idx, perm, flat_index):
    torch._check(weight.dim() == 2 and row_ptr.shape[0] == weight.shape[0] + 1,
                 lambda: f"weight must be 2-D (out_features, in_features) with row_ptr of out_features + 1 "
                         f"entries, got weight of shape {tuple(weight.shape)}")
    torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"x must be (batch, in_features = {weight.shape[1]}), got shape {tuple(x.shape)}")
    torch._check(flat_index.dtype == torch.int64 and flat_index.shape == col_idx.shape,
                 lambda: f"flat_index must be int64 with one entry per nonzero ({col_idx.numel()})")
    return _csr_spmm_fake(x, row_ptr, col_idx, weight.new_empty(col_idx.shape), None, bias)


@torch.library.register_fake("sparsemom::csr_linear_backward")
def _csr_linear_backward_fake(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm):
    _csr_fake_checks(col_ptr, row_idx)
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (batch, features), got shape {tuple(x.shape)}")
    torch._check(x.shape[1] == col_ptr.shape[0] - 1,
                 lambda: f"x must have in_features = {col_ptr.shape[0] - 1} columns, got shape {tuple(x.shape)}")
    _check_slots(values, col_idx)
    return (_csr_spmm_fake(grad, col_ptr, row_idx, values.new_empty(col_idx.shape), perm, None),
            values.new_empty(values.shape))


# --------------------------------------------------------------------------- sparse convolution
_CONV_RULES = """
    The conv weight is an ``(out_channels, in_channels * kh * kw)`` matrix in CSR: row
    ``o`` is output channel ``o``, column ``(c * kh + i) * kw + j`` is input channel ``c``
    at kernel offset ``(i, j)`` (the order of ``weight.reshape(out_channels, -1)`` of an
    ``nn.Conv2d``). ``kernel_size``, ``stride`` and ``padding`` are pairs ``(h, w)``;
    dilation 1, groups 1, zero padding. The kernels read and write activations *batch
    innermost*: an ``(n, c, h, w)`` tensor whose memory is ``(c, h, w, n)`` contiguous
    (``x.permute(1, 2, 3, 0).is_contiguous()``): each weight then adds a shifted window of
    vectors over the batch. Results come in that layout (shape ``(n, c, h, w)``, strides
    ``(1, h * w * n, w * n, n)``), so stacked sparse convs (through elementwise ops) copy
    nothing; inputs in any other layout are copied into it once. float32 and float64 on
    the CPU; CUDA tensors raise (there are no CUDA kernels yet).
"""


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output length of a convolution along one dimension (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def _conv_pair(value, name: str):
    """``value`` (an int or a pair of ints) as a pair; ValueError naming ``name`` otherwise (the
    op checks the ranges)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def csr_conv2d(x: Tensor, values: Tensor, bias: Optional[Tensor], row_ptr: Tensor, col_idx: Tensor,
               col_ptr: Tensor, row_idx: Tensor, perm: Tensor, kernel_size, stride=1, padding=0) -> Tensor:
    """``conv2d(x, W, bias, stride, padding)`` for ``W`` in CSR, with autograd for ``x``,
    ``values`` and ``bias``: ``(n, out_channels, oh, ow)``, batch innermost in memory.

    ``(col_ptr, row_idx, perm)`` is ``csr_transpose(row_ptr, col_idx, in_channels * kh * kw)``:
    the gradient of ``x`` walks it. ``values`` may have idle slots past the structure's nnz
    (a :class:`~sparsemom_ext.nn.CsrConv2d`'s fixed capacity): not read, gradient 0. The
    gradient of ``values`` is :func:`csr_conv2d_weight_grad` at the nonzeros; the gradient of
    ``x`` comes back in ``x``'s layout (contiguous for a contiguous ``x``). Under
    ``torch.autocast`` the op runs in float32 (float16/bfloat16 operands are cast up), the
    precision of its kernels. There is no double backward.
    """
    if torch.is_autocast_enabled(x.device.type):
        x, values, bias = (t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                           for t in (x, values, bias))
    return torch.ops.sparsemom.csr_conv2d(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm,
                                          _conv_pair(kernel_size, "kernel_size"), _conv_pair(stride, "stride"),
                                          _conv_pair(padding, "padding"))


def csr_conv2d_weight_grad(grad_out: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, kernel_size,
                           stride=1, padding=0) -> Tensor:
    """The weight gradient of ``y = conv2d(x, W)`` at the structure's positions: ``(nnz,)``.

    ``out[k] = sum over n, oy, ox of grad_out[n, row(k), oy, ox] * x[n, c, oy * sh - ph + i,
    ox * sw - pw + j]`` for nonzero ``k`` at column ``(c, i, j)``: the conv's SDDMM, what the
    engine samples candidate gradients with; nothing of the dense weight's size is formed.
    ``row_ptr`` has ``out_channels + 1`` entries, ``grad_out`` is ``(n, out_channels, oh,
    ow)``. No autograd: ``ValueError`` when ``grad_out`` or ``x`` requires grad.
    """
    _check_no_grad_wanted("csr_conv2d_weight_grad", grad_out=grad_out, x=x)
    return torch.ops.sparsemom.csr_conv2d_weight_grad(grad_out, x, row_ptr, col_idx,
                                                      _conv_pair(kernel_size, "kernel_size"),
                                                      _conv_pair(stride, "stride"), _conv_pair(padding, "padding"))


for _fn in (csr_conv2d, csr_conv2d_weight_grad):
    _fn.__doc__ += _CONV_RULES


def contiguous_from_batch_innermost(y: Tensor) -> Tensor:
    """A batch-innermost ``(n, c, h, w)`` tensor (a csr conv's output) as a contiguous one,
    differentiably: one blocked transpose of its ``(c * h * w, n)`` view, whose backward
    hands the gradient back batch innermost (what the conv's backward reads). Other
    tensors are returned as they are when contiguous, else made contiguous."""
    if y.is_contiguous() or y.numel() == 0:
        return y.contiguous()
    n, c, h, w = y.shape
    columns = y.permute(1, 2, 3, 0)
    if not columns.is_contiguous():
        return y.contiguous()
    return torch.ops.sparsemom.transpose_contiguous(columns.reshape(c * h * w, n)).view(n, c, h, w)


def _batch_innermost_empty(like: Tensor, n: int, c: int, h: int, w: int) -> Tensor:
    return like.new_empty((c, h, w, n)).permute(3, 0, 1, 2)


def _conv_fake_output(x, row_ptr, kernel_size, stride, padding):
    torch._check(x.dim() == 4, lambda: f"x must be 4-D (n, c, h, w), got shape {tuple(x.shape)}")
    oh, ow = (conv_output_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d]) for d in range(2))
    return _batch_innermost_empty(x, x.shape[0], row_ptr.shape[0] - 1, oh, ow)


@torch.library.register_fake("sparsemom::csr_conv2d")
def _csr_conv2d_fake(x, values, bias, row_ptr, col_idx, col_ptr, row_idx, perm, kernel_size, stride, padding):
    _csr_fake_checks(row_ptr, col_idx)
    _check_slots(values, col_idx)
    return _conv_fake_output(x, row_ptr, kernel_size, stride, padding)


@torch.library.register_fake("sparsemom::csr_conv2d_forward")
def _csr_conv2d_forward_fake(x, values, bias, row_ptr, col_idx, kernel_size, stride, padding):
    _csr_fake_checks(row_ptr, col_idx)
    _check_slots(values, col_idx)
    return _conv_fake_output(x, row_ptr, kernel_size, stride, padding)


@torch.library.register_fake("sparsemom::csr_conv2d_input_grad")
def _csr_conv2d_input_grad_fake(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size, stride,
                                padding):
    _csr_fake_checks(col_ptr, row_idx)
    torch._check(grad_out.dim() == 4, lambda: f"grad_out must be 4-D, got shape {tuple(grad_out.shape)}")
    channels = (col_ptr.shape[0] - 1) // (kernel_size[0] * kernel_size[1])
    return _batch_innermost_empty(grad_out, grad_out.shape[0], channels, input_size[0], input_size[1])


@torch.library.register_fake("sparsemom::csr_conv2d_weight_grad")
def _csr_conv2d_weight_grad_fake(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding):
    _csr_fake_checks(row_ptr, col_idx)
    torch._check(grad_out.dim() == 4 and x.dim() == 4, lambda: "grad_out and x must be 4-D (n, c, h, w)")
    return x.new_empty(col_idx.shape)
