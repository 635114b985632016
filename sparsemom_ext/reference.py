"""Pure-PyTorch semantics of every ``torch.ops.sparsemom`` operator: the test oracle.

Each function has the signature of the op in :mod:`sparsemom_ext.ops` and computes
the same result with plain tensor operations, written for clarity, not speed. The
fused optimizer steps follow torch.optim's single-tensor SGD / Adam arithmetic in
"opmath" precision (float32 for float16/bfloat16/float32 inputs, float64 for
float64), rounding to the storage dtype where a tensor is stored (optimizer state,
the parameter); other intermediates stay in opmath. The selection ops sort integer
keys with a stable sort, which gives the tie rule (lower flat index first) for free.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .csr_structure import check_canonical_structure, csr_to_mask


def _opmath(t: Tensor) -> Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _store(target: Tensor, value: Tensor) -> Tensor:
    """Write ``value`` into ``target`` (rounding to its dtype); return the rounded value in opmath."""
    target.copy_(value)
    return _opmath(target)


def mask_apply_(weight: Tensor, mask: Tensor) -> None:
    weight.masked_fill_(~mask, 0)


def mask_matches_csr(mask: Tensor, row_ptr: Tensor, col_idx: Tensor) -> bool:
    check_canonical_structure(row_ptr, col_idx, mask.shape[0], mask.shape[1])
    return torch.equal(csr_to_mask(row_ptr, col_idx, mask.shape[1]), mask)


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


# --------------------------------------------------------------------------- selection
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _magnitude_bits(values: Tensor) -> Tensor:
    """|values| as the unsigned integer its bits spell (sign bit cleared), as int64, flat.

    Monotone in |x| for IEEE floats, with NaN above +inf: the order of every selection.
    """
    bits = values.contiguous().view(_INT_OF_WIDTH[values.element_size()]).reshape(-1)
    width = 8 * values.element_size()
    return bits.to(torch.int64) & ((1 << (width - 1)) - 1)


def _remove_smallest(mask_flat: Tensor, out_flat: Tensor, candidates: Tensor, key: Tensor, k: int) -> None:
    """Flip the k candidates (flat indices, increasing) of smallest key, ties by index."""
    order = torch.sort(key[candidates], stable=True).indices
    chosen = candidates[order[:k]]
    out_flat[chosen] = ~mask_flat[chosen]


def _check_k(k: int, available: int, what: str) -> None:
    if not 0 <= k <= available:
        raise ValueError(f"k must be in [0, {available}] (the number of {what}), got k={k}")


def magnitude_prune(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    mask_flat = mask.reshape(-1).clone()
    out = mask_flat.clone()
    active = torch.nonzero(mask_flat).reshape(-1)
    _check_k(k, active.numel(), "active positions in mask")
    _remove_smallest(mask_flat, out, active, _magnitude_bits(weight), k)
    return out.reshape(mask.shape)


def momentum_grow(score: Tensor, mask: Tensor, k: int) -> Tensor:
    mask_flat = mask.reshape(-1).clone()
    out = mask_flat.clone()
    inactive = torch.nonzero(~mask_flat).reshape(-1)
    _check_k(k, inactive.numel(), "inactive positions in mask")
    # Largest |score| first: smallest negated key; a stable sort keeps index order in ties.
    _remove_smallest(mask_flat, out, inactive, -_magnitude_bits(score), k)
    return out.reshape(mask.shape)


def set_prune_sides(weight: Tensor, mask: Tensor):
    """Flat indices of the active weights on the >= 0 side and on the < 0 side.

    A weight is on the < 0 side when its sign bit is set and it is not zero (-0.0 is
    a zero, on the >= 0 side); NaN goes by its sign bit.
    """
    mask_flat = mask.reshape(-1)
    magnitude = _magnitude_bits(weight)
    width = 8 * weight.element_size()
    sign = (weight.contiguous().view(_INT_OF_WIDTH[weight.element_size()]).reshape(-1).to(torch.int64)
            >> (width - 1)) != 0
    negative = sign & (magnitude != 0)
    return (torch.nonzero(mask_flat & ~negative).reshape(-1),
            torch.nonzero(mask_flat & negative).reshape(-1))


def set_prune_split(k: int, positive: int, negative: int):
    """How many SET removes on each side: ceil(k/2) from the >= 0 side, floor(k/2)
    from the < 0 side, what a side lacks taken from the other."""
    from_positive, from_negative = k - k // 2, k // 2
    if from_positive > positive:
        from_negative += from_positive - positive
        from_positive = positive
    if from_negative > negative:
        from_positive += from_negative - negative
        from_negative = negative
    return from_positive, from_negative


def set_prune(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    mask_flat = mask.reshape(-1).clone()
    out = mask_flat.clone()
    positive, negative = set_prune_sides(weight, mask)
    _check_k(k, positive.numel() + negative.numel(), "active positions in mask")
    from_positive, from_negative = set_prune_split(k, positive.numel(), negative.numel())
    # Closest to zero on both sides: smallest |w| (the < 0 side's largest values).
    magnitude = _magnitude_bits(weight)
    _remove_smallest(mask_flat, out, positive, magnitude, from_positive)
    _remove_smallest(mask_flat, out, negative, magnitude, from_negative)
    return out.reshape(mask.shape)


# --------------------------------------------------------------------------- sparse matmul
def _row_of_each_nonzero(row_ptr: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device),
                                   row_ptr.diff().long())


def _csr_dense_opmath(row_ptr: Tensor, col_idx: Tensor, values: Tensor, n_cols: int) -> Tensor:
    rows = _row_of_each_nonzero(row_ptr)
    dense = torch.zeros(row_ptr.numel() - 1, n_cols, dtype=_opmath(values).dtype, device=values.device)
    return dense.index_put_((rows, col_idx.long()), _opmath(values), accumulate=True)


def csr_spmm(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
             value_perm: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    if value_perm is not None:
        values = values[value_perm.long()]
    y = _opmath(x) @ _csr_dense_opmath(row_ptr, col_idx, values, x.shape[1]).T
    if bias is not None:
        y = y + _opmath(bias)
    return y.to(x.dtype)


def csr_sddmm(a: Tensor, b: Tensor, row_ptr: Tensor, col_idx: Tensor) -> Tensor:
    rows = _row_of_each_nonzero(row_ptr)
    return (_opmath(a)[:, rows] * _opmath(b)[:, col_idx.long()]).sum(0).to(a.dtype)


def csr_transpose(row_ptr: Tensor, col_idx: Tensor, n_cols: int):
    rows = _row_of_each_nonzero(row_ptr)
    # Stable sort by column keeps the rows increasing within a column.
    perm = torch.sort(col_idx.long(), stable=True).indices
    counts = torch.bincount(col_idx.long(), minlength=n_cols)
    col_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return col_ptr.int(), rows[perm].int(), perm.int()


def csr_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], row_ptr: Tensor, col_idx: Tensor,
               col_ptr: Tensor, row_idx: Tensor, perm: Tensor) -> Tensor:
    """Differentiable in x, values and bias (plain torch autograd); entries of ``values`` past
    the nnz are idle slots (not read, gradient 0)."""
    rows = _row_of_each_nonzero(row_ptr)
    weight = torch.zeros(row_ptr.numel() - 1, x.shape[-1], dtype=values.dtype, device=values.device)
    weight = weight.index_put((rows, col_idx.long()), values[: col_idx.numel()], accumulate=True)
    return torch.nn.functional.linear(x, weight, bias)


def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], row_ptr: Tensor, col_idx: Tensor,
                  col_ptr: Tensor, row_idx: Tensor, perm: Tensor, flat_index: Tensor) -> Tensor:
    """``x @ W.T + bias`` with ``W`` the entries of ``weight`` at ``flat_index`` (zero elsewhere);
    differentiable in x, bias and ``weight``, whose gradient is dense: every entry, active
    or not, gets ``grad.T @ x`` (plain torch autograd)."""
    active = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    active[flat_index] = True
    active = active.reshape(weight.shape)
    # Forward: the active entries only; backward: d/dweight is 1 everywhere.
    effective = torch.where(active, weight, weight - weight.detach())
    return torch.nn.functional.linear(x, effective, bias)


def csr_linear_backward(grad: Tensor, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                        col_ptr: Tensor, row_idx: Tensor, perm: Tensor):
    """(grad of x, grad of values) of ``y = x @ W.T``, from the dense weight, independently of
    the transposed structure (which must describe the same matrix)."""
    nnz = col_idx.numel()
    weight = _csr_dense_opmath(row_ptr, col_idx, values[:nnz], x.shape[1])
    grad_x = (_opmath(grad) @ weight).to(grad.dtype)
    grad_values = torch.zeros_like(values)
    grad_values[:nnz] = csr_sddmm(grad, x, row_ptr, col_idx)
    return grad_x, grad_values


# --------------------------------------------------------------------------- sparse convolution
def _csr_conv_weight(values: Tensor, row_ptr: Tensor, col_idx: Tensor, in_channels: int, kernel_size) -> Tensor:
    """The dense ``(out, in, kh, kw)`` weight of a csr conv (columns: ``(c_in, kh, kw)`` row-major)."""
    kh, kw = kernel_size
    n_cols = in_channels * kh * kw
    rows = _row_of_each_nonzero(row_ptr)
    weight = torch.zeros(row_ptr.numel() - 1, n_cols, dtype=values.dtype, device=values.device)
    weight = weight.index_put((rows, col_idx.long()), values[: col_idx.numel()], accumulate=True)
    return weight.reshape(-1, in_channels, kh, kw)


def csr_conv2d(x: Tensor, values: Tensor, bias: Optional[Tensor], row_ptr: Tensor, col_idx: Tensor,
               col_ptr: Tensor, row_idx: Tensor, perm: Tensor, kernel_size, stride=(1, 1), padding=(0, 0)) -> Tensor:
    """``F.conv2d`` with the dense weight of the structure; differentiable in x, values (idle
    slots past nnz get gradient 0) and bias (plain torch autograd)."""
    weight = _csr_conv_weight(values, row_ptr, col_idx, x.shape[1], kernel_size)
    return torch.nn.functional.conv2d(x, weight, bias, tuple(stride), tuple(padding))


def csr_conv2d_weight_grad(grad_out: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, kernel_size,
                           stride=(1, 1), padding=(0, 0)) -> Tensor:
    """The dense weight gradient of ``conv2d(x, W)`` for output gradient ``grad_out``, at the
    structure's nonzeros (in opmath, returned in ``x``'s dtype)."""
    kh, kw = kernel_size
    shape = (row_ptr.numel() - 1, x.shape[1], kh, kw)
    dense = torch.nn.grad.conv2d_weight(_opmath(x), shape, _opmath(grad_out), tuple(stride), tuple(padding))
    return dense.reshape(shape[0], -1)[_row_of_each_nonzero(row_ptr), col_idx.long()].to(x.dtype)
