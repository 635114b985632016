"""Topology changes of a csr-layout layer: new structure, values and optimizer state.

A topology update keeps some of the layer's nonzeros and adds new positions. Every
per-nonzero tensor (the weights, the optimizer's momentum buffers, Adam's moments) is
re-laid out by the same :class:`Relayout`: a kept entry moves with its position (its
value and state are kept), a grown entry starts from a given fill (zero, or the
momentum accumulated for it). The cost is O(nnz log nnz); nothing of size
``n_rows x n_cols`` is formed.
"""

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Relayout", "flat_indices", "relayout_plan", "structure_from_flat"]


def flat_indices(row_ptr: torch.Tensor, col_idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The sorted int64 flat indices ``row * n_cols + col`` of a canonical CSR structure."""
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device),
                                   row_ptr.diff().long())
    return rows * n_cols + col_idx.long()


def structure_from_flat(flat: torch.Tensor, n_rows: int, n_cols: int):
    """``(row_ptr, col_idx)`` (int32) of the sorted, distinct flat indices ``flat``."""
    if flat.numel() == 0:  # also covers n_cols == 0, where // and % would divide by zero
        return torch.zeros(n_rows + 1, dtype=torch.int32, device=flat.device), flat.to(torch.int32)
    counts = torch.bincount(flat // n_cols, minlength=n_rows)
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int32, device=flat.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=row_ptr[1:])
    return row_ptr, (flat % n_cols).to(torch.int32)


@dataclass
class Relayout:
    """How the nonzeros of a layer move in one topology update.

    ``kept``: indices (into the old nonzeros) of the kept ones, ascending;
    ``order``: for each new nonzero, its index in ``cat([old[kept], grown])``;
    ``flat``: the new nonzeros' sorted flat indices; ``n_grown``: how many are new.
    """

    kept: torch.Tensor
    order: torch.Tensor
    flat: torch.Tensor
    n_grown: int

    def apply(self, old: torch.Tensor, grown: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-nonzero tensor ``old`` in the new layout; grown entries are ``grown``
        (one per grown position, in ascending flat order) or zero."""
        if grown is None:
            grown = old.new_zeros(self.n_grown)
        elif grown.shape != (self.n_grown,):
            raise ValueError(f"grown must have one entry per grown position ({self.n_grown}), "
                             f"got shape {tuple(grown.shape)}")
        return torch.cat([old[self.kept], grown.to(old.dtype)])[self.order]


def relayout_plan(old_flat: torch.Tensor, keep: torch.Tensor, grown_flat: torch.Tensor) -> Relayout:
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
