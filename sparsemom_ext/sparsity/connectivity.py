"""The connectivity rule: no output unit of a sparse layer is ever left without an input.

A sparse layer is an ``(n_rows, n_cols)`` matrix (rows: output units, or a conv's output
channels; columns: inputs, or a conv's unfolded patch entries). Under
``connectivity="floor"`` (the default of :func:`sparsemom_ext.sparsify` and
:class:`~sparsemom_ext.SparseMomentum`) every row holds at least one active weight, so a
layer never has fewer than its *floor*, ``n_rows`` active weights (``0`` for a layer
without columns), whatever redistribution asks. ``connectivity="reference"`` is the
reference code's behaviour: a layer may lose every weight of a unit, or all of them.

The rule is kept in three places (docs/algorithms.md, section 5):

- :func:`floor_counts` raises the initial count of a layer below its floor to it, taking
  the difference from the layers above theirs (the total stays exact);
- :func:`connect_rows` moves surplus positions of a drawn mask into its empty rows;
- at an update (:class:`~sparsemom_ext.SparseMomentum`), pruning is the reference's, and each
  row it empties regrows one position of that row, the one its growth method offers first
  (:meth:`~.growth.GrowthPool.row_picks`), from the layer's share of the regrowth; a row its
  growth has no candidate in keeps its largest weight unpruned instead
  (:func:`best_per_row`).
"""

from typing import List, Sequence

import torch

from .init import check_choice
from .schedule import apportion

__all__ = ["CONNECTIVITIES", "check_connectivity", "connect_rows", "empty_rows", "empty_rows_of_flat",
           "best_per_row", "floor_counts", "layer_floor"]

CONNECTIVITIES = ("floor", "reference")


def check_connectivity(connectivity) -> str:
    """``connectivity`` if it is one of :data:`CONNECTIVITIES`, else a ValueError naming them."""
    check_choice("connectivity", connectivity, CONNECTIVITIES)
    return connectivity


def layer_floor(n_rows: int, n_cols: int) -> int:
    """The fewest active weights a layer keeps under the rule: one per output unit."""
    return n_rows if n_cols > 0 else 0


def floor_counts(counts: Sequence[int], floors: Sequence[int], names: Sequence[str]) -> List[int]:
    """``counts`` with every count below its floor raised to it, the difference taken from the
    layers above their floors in proportion to their surplus (exact integers, by
    :func:`~sparsemom_ext.sparsity.schedule.apportion`), so the sum is unchanged.

    ValueError when the counts together are fewer than the floors: the density is too low
    for every output unit to keep an input.
    """
    total, needed = sum(counts), sum(floors)
    if total < needed:
        raise ValueError(
            f"connectivity='floor' keeps one input per output unit: the {len(counts)} sparse layers "
            f"({', '.join(names)}) have {needed} output units, but the density gives them {total} weights in all; "
            "raise the density or pass connectivity='reference' (layers may then lose units)")
    deficit = sum(max(0, f - c) for c, f in zip(counts, floors))
    if deficit == 0:
        return list(counts)
    surplus = [max(0, c - f) for c, f in zip(counts, floors)]
    taken = apportion(deficit, [float(s) for s in surplus], surplus)
    return [max(c, f) - t for c, f, t in zip(counts, floors, taken)]


def empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """The indices of the rows of ``mask`` (its first dimension; the rest are its columns) that
    hold no active position."""
    rows = mask.reshape(mask.shape[0], -1) if mask.dim() else mask.reshape(1, 1)
    return (~rows.any(dim=1)).nonzero().reshape(-1)


def connect_rows(mask: torch.Tensor, generator) -> torch.Tensor:
    """``mask`` (bool, first dimension the rows) with each empty row given one active position,
    the count unchanged: for each empty row a column is drawn uniformly, and as many positions
    leave the rows holding more than one, drawn uniformly among all but the first (lowest)
    position of each row, so no row is emptied. Draws from ``generator`` only when a row is
    empty, so a mask that satisfies the rule is returned as it was (the same tensor).

    ValueError when the mask has fewer active positions than rows.
    """
    empty = empty_rows(mask)
    if empty.numel() == 0 or mask.numel() == 0:
        return mask
    n_rows = mask.shape[0]
    n_cols = mask.numel() // n_rows
    flat = mask.reshape(-1).nonzero().reshape(-1)
    if flat.numel() < n_rows:
        raise ValueError(f"a mask of {n_rows} rows needs at least {n_rows} active positions to give every row one, "
                         f"it has {flat.numel()}")
    rows = torch.div(flat, n_cols, rounding_mode="floor")
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # flat is sorted: the first position of each row
    surplus = flat[~first]
    leaving = surplus[torch.randperm(surplus.numel(), generator=generator)[: empty.numel()].to(surplus.device)]
    cols = torch.randint(n_cols, (empty.numel(),), generator=generator).to(mask.device)
    result = mask.clone()
    result.view(-1)[leaving] = False
    result.view(-1)[empty * n_cols + cols] = True
    return result


def best_per_row(rows_of: torch.Tensor, score: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices into ``score`` (entries of rows ``rows_of``, in increasing flat order): for each
    of ``rows`` holding an entry, the entry of largest |score| (ties to the lower index)."""
    wanted = torch.isin(rows_of, rows)
    index = wanted.nonzero().reshape(-1)
    if index.numel() == 0:
        return index
    magnitude = score[index].abs()
    group = torch.searchsorted(rows, rows_of[index])
    best = torch.full((rows.numel(),), -1.0, dtype=magnitude.dtype, device=magnitude.device)
    best = best.scatter_reduce(0, group, magnitude, reduce="amax")
    at_best = magnitude == best[group]
    first = torch.full((rows.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, group[at_best], at_best.nonzero().reshape(-1), reduce="amin")
    return index[first[first < index.numel()]]


def empty_rows_of_flat(flat: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """The rows of an ``(n_rows, n_cols)`` matrix whose active positions are ``flat`` (flat
    indices) that hold none."""
    covered = torch.zeros(n_rows, dtype=torch.bool, device=flat.device)
    covered[torch.div(flat, n_cols, rounding_mode="floor")] = True
    return (~covered).nonzero().reshape(-1)
