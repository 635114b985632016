"""The CSR structure rules, in one place: conversions, flat indices, validation, re-layout.

A structure is ``row_ptr`` (int32, ``n_rows + 1`` entries, from 0, non-decreasing, ending
at nnz) and ``col_idx`` (int32, nnz entries in ``[0, n_cols)``). The layers keep it
*canonical*: columns strictly increasing within each row, so the nonzeros in CSR order
are the True entries of the mask in row-major order, and each nonzero has one flat
index ``row * n_cols + col`` (sorted ascending in CSR order). Everything here is plain
torch (any device); it runs when a structure is built or changes, never per step.

A topology update keeps some nonzeros of a layer and adds new positions; every
per-nonzero tensor (the weights, the optimizer's momentum buffers, Adam's moments) is
re-laid out by the same :class:`Relayout`: a kept entry moves with its position, a grown
entry starts from a given fill (zero, or the momentum accumulated for it). The cost is
O(nnz log nnz); nothing of size ``n_rows x n_cols`` is formed.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["INT32_MAX", "Relayout", "check_canonical_structure", "check_structure", "csr_from_mask", "csr_to_dense",
           "csr_to_mask", "csr_values_from_dense", "flat_indices", "relayout_plan", "structure_from_flat"]


#: The largest nnz and the largest column count of a structure: its indices are int32.
INT32_MAX = 2**31 - 1


def _check_fits_int32(nnz: int, n_cols: int) -> None:
    if nnz > INT32_MAX:
        raise ValueError(f"a CSR structure holds at most 2^31 - 1 nonzeros (row_ptr and col_idx are int32), "
                         f"this one would have {nnz} or more")
    if n_cols > INT32_MAX + 1:
        raise ValueError(f"a CSR structure has at most 2^31 columns (col_idx is int32), got n_cols = {n_cols}")


def _row_counts(mask: Tensor) -> Tensor:
    """The number of True entries of each row of a 2-D bool ``mask``; ValueError as soon as their
    total passes int32 (an int32 cumsum would wrap, and col_idx be allocated for it)."""
    n_rows, n_cols = mask.shape
    _check_fits_int32(0, n_cols)
    if mask.numel() <= INT32_MAX:  # neither a row nor the total can pass int32
        return mask.sum(dim=1, dtype=torch.int32)
    # A reduction of a bool tensor casts it: a block of rows at a time bounds that copy, and
    # the count stops at the block where the total passes int32.
    dtype = torch.int32 if n_cols <= INT32_MAX else torch.int64
    rows = max(1, 2**24 // n_cols)
    blocks, total = [], 0
    for start in range(0, n_rows, rows):
        blocks.append(mask[start:start + rows].sum(dim=1, dtype=dtype))
        total += int(blocks[-1].sum(dtype=torch.int64))
        _check_fits_int32(total, n_cols)
    return torch.cat(blocks)


def csr_from_mask(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``(row_ptr, col_idx)`` (int32) of the True entries of a 2-D bool ``mask``, columns sorted.

    ValueError, before anything of the structure's size is allocated, if it would not fit int32."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 2-D bool tensor, got {got}")
    counts = _row_counts(mask)
    row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=row_ptr[1:])
    col_idx = mask.nonzero()[:, 1].to(torch.int32)
    return row_ptr, col_idx


def _row_of_each_nonzero(row_ptr: Tensor) -> Tensor:
    counts = row_ptr.diff().long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts)


def check_structure(row_ptr: Tensor, col_idx: Tensor, n_cols: int, n_rows: Optional[int] = None) -> None:
    """Raise ValueError naming the argument unless ``(row_ptr, col_idx)`` is a structure of a matrix
    of ``n_cols`` columns (and ``n_rows`` rows, when given) by the rules of the module docstring;
    columns may come in any order and repeat. One read of the indices' extremes, on any device."""
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {got}")
    if col_idx.device != row_ptr.device:
        raise ValueError(f"col_idx must be on the device of row_ptr ({row_ptr.device}), got {col_idx.device}")
    if isinstance(n_cols, bool) or not isinstance(n_cols, int) or not 0 <= n_cols <= INT32_MAX + 1:
        raise ValueError(f"n_cols must be an int in [0, 2^31], got {n_cols!r}")
    if row_ptr.numel() < 1 or (n_rows is not None and row_ptr.numel() != n_rows + 1):
        expected = "n_rows + 1 >= 1" if n_rows is None else f"n_rows + 1 = {n_rows + 1}"
        raise ValueError(f"row_ptr must have {expected} entries, got {row_ptr.numel()}")
    nnz = col_idx.numel()
    zero = row_ptr.new_zeros(1)
    first, last, min_step, low, high = torch.cat([
        row_ptr[:1], row_ptr[-1:], row_ptr.diff().min().reshape(1) if row_ptr.numel() > 1 else zero,
        col_idx.min().reshape(1) if nnz else zero, col_idx.max().reshape(1) if nnz else zero]).tolist()
    if first != 0:
        raise ValueError(f"row_ptr must start at 0, got row_ptr[0]={first}")
    if last != nnz:
        raise ValueError(f"row_ptr must end at nnz = col_idx.numel() = {nnz}, got row_ptr[-1]={last}")
    if min_step < 0:
        raise ValueError("row_ptr must be non-decreasing (a row cannot have a negative number of nonzeros)")
    if nnz and (low < 0 or high >= n_cols):
        raise ValueError(f"col_idx must be in [0, n_cols = {n_cols}), got values in [{low}, {high}]")


def csr_to_mask(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> Tensor:
    """The ``(n_rows, n_cols)`` bool mask of a CSR structure (checked: :func:`check_structure`)."""
    check_structure(row_ptr, col_idx, n_cols)
    mask = torch.zeros(row_ptr.numel() - 1, n_cols, dtype=torch.bool, device=row_ptr.device)
    mask[_row_of_each_nonzero(row_ptr), col_idx.long()] = True
    return mask


def csr_values_from_dense(weight: Tensor, row_ptr: Tensor, col_idx: Tensor) -> Tensor:
    """The entries of a dense 2-D ``weight`` at the structure's positions, in CSR order (the structure
    is checked against ``weight``'s shape: :func:`check_structure`)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor, got {got}")
    check_structure(row_ptr, col_idx, weight.shape[1], n_rows=weight.shape[0])
    if row_ptr.device != weight.device:
        raise ValueError(f"row_ptr must be on the device of weight ({weight.device}), got {row_ptr.device}")
    return weight[_row_of_each_nonzero(row_ptr), col_idx.long()]


def csr_to_dense(values: Tensor, row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> Tensor:
    """The dense ``(n_rows, n_cols)`` matrix, zero off the structure (repeated positions add up;
    the structure is checked: :func:`check_structure`)."""
    check_structure(row_ptr, col_idx, n_cols)
    if not isinstance(values, Tensor) or values.shape != col_idx.shape or values.device != row_ptr.device:
        got = f"shape {tuple(values.shape)} on {values.device}" if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a 1-D tensor with one entry per nonzero ({col_idx.numel()}) on the "
                         f"device of row_ptr ({row_ptr.device}), got {got}")
    dense = torch.zeros(row_ptr.numel() - 1, n_cols, dtype=values.dtype, device=values.device)
    dense.index_put_((_row_of_each_nonzero(row_ptr), col_idx.long()), values, accumulate=True)
    return dense


def _flat(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> Tensor:
    return _row_of_each_nonzero(row_ptr) * n_cols + col_idx.long()


def flat_indices(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> Tensor:
    """The int64 flat indices ``row * n_cols + col`` of a CSR structure (checked:
    :func:`check_structure`), sorted when the structure is canonical."""
    check_structure(row_ptr, col_idx, n_cols)
    return _flat(row_ptr, col_idx, n_cols)


def structure_from_flat(flat: Tensor, n_rows: int, n_cols: int) -> Tuple[Tensor, Tensor]:
    """``(row_ptr, col_idx)`` (int32) of the sorted, distinct flat indices ``flat`` of an
    ``n_rows x n_cols`` matrix; ValueError naming ``flat`` unless they are that."""
    if not isinstance(flat, Tensor) or flat.dtype != torch.int64 or flat.dim() != 1:
        got = f"{flat.dtype} of shape {tuple(flat.shape)}" if isinstance(flat, Tensor) else type(flat).__name__
        raise ValueError(f"flat must be a 1-D int64 tensor, got {got}")
    _check_fits_int32(flat.numel(), n_cols)
    if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= n_rows * n_cols
                         or (flat.numel() > 1 and not bool((flat.diff() > 0).all()))):
        raise ValueError(f"flat must be sorted, distinct flat indices in [0, n_rows * n_cols = {n_rows * n_cols})")
    if flat.numel() == 0:  # also covers n_cols == 0, where // and % would divide by zero
        return torch.zeros(n_rows + 1, dtype=torch.int32, device=flat.device), flat.to(torch.int32)
    counts = torch.bincount(flat // n_cols, minlength=n_rows)
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int32, device=flat.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=row_ptr[1:])
    return row_ptr, (flat % n_cols).to(torch.int32)


def check_canonical_structure(row_ptr: Tensor, col_idx: Tensor, n_rows: int, n_cols: int) -> None:
    """Raise ValueError naming the argument unless ``(row_ptr, col_idx)`` is a canonical
    structure of an ``n_rows x n_cols`` matrix (the rules of the module docstring)."""
    check_structure(row_ptr, col_idx, n_cols, n_rows=n_rows)
    flat = _flat(row_ptr, col_idx, n_cols)
    if col_idx.numel() > 1 and not bool((flat.diff() > 0).all()):
        raise ValueError("col_idx must be strictly increasing within each row (sorted, no repeated column)")


@dataclass
class Relayout:
    """How the nonzeros of a layer move in one topology update.

    ``kept``: indices (into the old nonzeros) of the kept ones, ascending;
    ``order``: for each new nonzero, its index in ``cat([old[kept], grown])``;
    ``flat``: the new nonzeros' sorted flat indices; ``n_grown``: how many are new.
    """

    kept: Tensor
    order: Tensor
    flat: Tensor
    n_grown: int

    @property
    def nnz(self) -> int:
        """The number of nonzeros after the update."""
        return self.flat.numel()

    def apply(self, old: Tensor, grown: Optional[Tensor] = None) -> Tensor:
        """The per-nonzero tensor ``old`` (one entry per old nonzero) in the new layout;
        grown entries are ``grown`` (one per grown position, in ascending flat order) or zero."""
        if grown is None:
            grown = old.new_zeros(self.n_grown)
        elif grown.shape != (self.n_grown,):
            raise ValueError(f"grown must have one entry per grown position ({self.n_grown}), "
                             f"got shape {tuple(grown.shape)}")
        return torch.cat([old[self.kept], grown.to(old.dtype)])[self.order]


def relayout_plan(old_flat: Tensor, keep: Tensor, grown_flat: Tensor) -> Relayout:
    """The :class:`Relayout` that keeps the old nonzeros where the bool ``keep`` is True and
    adds ``grown_flat`` (sorted flat indices, none of them kept)."""
    kept = keep.nonzero().reshape(-1)
    kept_flat = old_flat[kept]
    grown_flat = grown_flat.to(old_flat.device)
    n_kept, n_grown = kept_flat.numel(), grown_flat.numel()
    # Merge two sorted lists without sorting: a grown position lands after the kept ones
    # smaller than it and after the grown ones before it.
    device = old_flat.device
    grown_at = torch.searchsorted(kept_flat, grown_flat) + torch.arange(n_grown, device=device)
    is_grown = torch.zeros(n_kept + n_grown, dtype=torch.bool, device=device)
    is_grown[grown_at] = True
    order = torch.empty(n_kept + n_grown, dtype=torch.int64, device=device)
    order[grown_at] = torch.arange(n_kept, n_kept + n_grown, device=device)
    order[~is_grown] = torch.arange(n_kept, device=device)
    flat = torch.empty(n_kept + n_grown, dtype=torch.int64, device=device)
    flat[grown_at] = grown_flat
    flat[~is_grown] = kept_flat
    return Relayout(kept, order, flat, n_grown)
