"""Candidate sampling for growth without a dense gradient (GSE, csr-layout sparse momentum).

A layer's weight is viewed as an ``(n_rows, n_cols)`` matrix (rows = outputs, columns =
inputs; a conv's columns are its unfolded patch entries) whose active positions are
given as sorted flat indices ``row * n_cols + col``. :func:`sample_inactive` draws a set
of distinct inactive positions, either uniformly or from GSE's GraBo distribution
``P(i, j) ~ g_i * f_j`` (``f_j``: summed |input activation j| over a batch, ``g_i``:
summed |output gradient i|). Both are drawn as independent row and column draws,
rejecting active positions and repeats, so the cost is O(candidates + nnz) and nothing
of size ``n_rows x n_cols`` is formed (see :func:`sample_inactive` for the one
exception). Every draw comes from an explicit CPU generator: the same seed gives the
same candidates on every process and device.
"""

import math
from typing import Optional

import torch

from ..nn.csr_layout import CsrLayer

__all__ = ["SAMPLINGS", "grabo_factors", "sample_inactive"]

SAMPLINGS = ("uniform", "grabo")


def _is_in(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Whether each query occurs in the sorted 1-D ``sorted_values`` (binary search; fastest
    when the queries are sorted too, as the searches then walk memory in order)."""
    if sorted_values.numel() == 0:
        return torch.zeros(queries.shape, dtype=torch.bool)
    where = torch.searchsorted(sorted_values, queries).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[where] == queries


def _first_new_inactive(sequence: torch.Tensor, active_flat: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` distinct inactive values of ``sequence`` in draw order, sorted."""
    # A stable sort puts equal values together in draw order: the first of each run is
    # its first occurrence; the sorted values also make the membership search fast.
    ordered, where = torch.sort(sequence, stable=True)
    keep = torch.ones(ordered.shape, dtype=torch.bool)
    torch.ne(ordered[1:], ordered[:-1], out=keep[1:])
    keep &= ~_is_in(active_flat, ordered)
    if int(keep.sum()) > count:  # cut in draw order, which keeps the sampling sequential
        kept_in_draw_order = torch.zeros(sequence.shape, dtype=torch.bool)
        kept_in_draw_order[where[keep]] = True
        last_draw = kept_in_draw_order.nonzero()[count - 1, 0]
        keep &= where <= last_draw
    return ordered[keep]


def _draw(weights: Optional[torch.Tensor], size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    if weights is None:
        return torch.randint(0, size, (n,), generator=generator)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def sample_inactive(n_rows: int, n_cols: int, active_flat: torch.Tensor, count: int,
                    generator: torch.Generator, row_weights: Optional[torch.Tensor] = None,
                    col_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sorted flat indices (int64, CPU) of at most ``count`` distinct inactive positions.

    ``active_flat``: the sorted flat indices of the active positions. Without weights the
    positions are uniform over the inactive ones; with ``row_weights`` (``g``, length
    ``n_rows``) and ``col_weights`` (``f``, length ``n_cols``), both non-negative, each draw
    picks ``(i, j)`` with probability proportional to ``g_i * f_j`` among the inactive
    positions not drawn yet (sequential sampling without replacement). Positions of
    probability 0 are never drawn, so fewer than ``count`` come back when fewer inactive
    positions have a positive probability; all of them come back when ``count`` reaches
    that number.

    Cost: rejection sampling, O(count + nnz) while the request is at most half of the
    eligible inactive positions (always the case for GSE's candidate sets at densities up
    to 1/3) and the weights are not too skewed. A larger request, or a skew that would need
    more draws than the layer has positions, enumerates the eligible positions instead,
    which is O(n_rows x n_cols).
    """
    active_flat = active_flat.to("cpu", torch.int64)
    weighted = row_weights is not None or col_weights is not None
    if weighted:
        if row_weights is None or col_weights is None:
            raise ValueError("row_weights and col_weights must be given together")
        row_weights = row_weights.detach().to("cpu", torch.float64)
        col_weights = col_weights.detach().to("cpu", torch.float64)
        if row_weights.shape != (n_rows,) or col_weights.shape != (n_cols,):
            raise ValueError(f"row_weights must have shape ({n_rows},) and col_weights ({n_cols},), got "
                             f"{tuple(row_weights.shape)} and {tuple(col_weights.shape)}")
        if not bool(torch.isfinite(row_weights).all() and torch.isfinite(col_weights).all()):
            raise ValueError("row_weights and col_weights must be finite")
        if bool((row_weights < 0).any() or (col_weights < 0).any()):
            raise ValueError("row_weights and col_weights must be non-negative")
        live_rows, live_cols = row_weights > 0, col_weights > 0
        active_rows, active_cols = active_flat // n_cols, active_flat % n_cols
        active_live = int((live_rows[active_rows] & live_cols[active_cols]).sum())
        eligible = int(live_rows.sum()) * int(live_cols.sum()) - active_live
        # The probability mass of the active positions, to size each round of draws.
        active_mass = float(row_weights[active_rows].mul_(col_weights[active_cols]).sum())
        total_mass = float(row_weights.sum()) * float(col_weights.sum())
        del active_rows, active_cols  # O(nnz) temporaries: free them before drawing
        free_fraction = 1.0 - active_mass / total_mass if total_mass > 0 else 0.0
    else:
        eligible = n_rows * n_cols - active_flat.numel()
        free_fraction = eligible / (n_rows * n_cols) if n_rows * n_cols else 0.0
    count = min(int(count), eligible)
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if 2 * count > eligible:
        return _sample_by_enumeration(n_rows, n_cols, active_flat, count, generator, row_weights, col_weights)
    chosen = torch.zeros(0, dtype=torch.int64)
    # The first round: a draw lands on an inactive position with probability free_fraction;
    # 10% more covers repeats while the request is small against the eligible positions.
    yield_per_draw = max(free_fraction, 1e-3)
    while chosen.numel() < count:
        wanted = count - chosen.numel()
        n = int(math.ceil(1.1 * wanted / yield_per_draw)) + 64
        if n > n_rows * n_cols:
            # A skewed GraBo distribution keeps redrawing its heavy positions: when a round
            # would draw more than the layer has positions, enumerating them costs less (in
            # time and memory) and gives the same law, the chosen ones excluded.
            taken = torch.cat([active_flat, chosen]).sort().values
            rest = _sample_by_enumeration(n_rows, n_cols, taken, wanted, generator, row_weights, col_weights)
            return torch.cat([chosen, rest]).sort().values
        draws = _draw(row_weights, n_rows, n, generator).mul_(n_cols).add_(_draw(col_weights, n_cols, n, generator))
        # The ones chosen in earlier rounds come first: all of them stay.
        before = chosen.numel()
        chosen = _first_new_inactive(torch.cat([chosen, draws]), active_flat, count)
        del draws
        # Size the next round by this one's yield of new positions per draw, which falls as
        # the heavy positions are taken (a skewed distribution took 535 rounds at the
        # first round's rate for 9400 candidates of a 300 x 784 layer).
        yield_per_draw = max(chosen.numel() - before, 1) / n
    return chosen


def _sample_by_enumeration(n_rows, n_cols, active_flat, count, generator, row_weights, col_weights):
    inactive = torch.ones(n_rows * n_cols, dtype=torch.bool)
    inactive[active_flat] = False
    if row_weights is None:
        positions = inactive.nonzero().reshape(-1)
        pick = torch.randperm(positions.numel(), generator=generator)[:count]
        return positions[pick].sort().values
    probability = (row_weights[:, None] * col_weights[None, :]).reshape(-1) * inactive
    positions = probability.nonzero().reshape(-1)
    pick = torch.multinomial(probability[positions], count, replacement=False, generator=generator)
    return positions[pick].sort().values


def grabo_factors(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """GraBo's ``(g, f)`` of one batch: summed |output gradient| per output (row) and summed
    |input| per input (column) of the layer's ``(n_rows, n_cols)`` weight matrix.

    For a conv the columns are the unfolded patch entries ``(c_in, kh, kw)`` and the sums
    also run over spatial positions (the conv as a linear layer on unfolded patches). A csr
    layer computes its own (:meth:`~sparsemom_ext.nn.csr_layout.CsrLayer.grabo_factors`).
    """
    if isinstance(module, CsrLayer):
        return module.grabo_factors(x, grad_out)
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"GraBo sampling needs groups=1 convolutions, got groups={module.groups}")
        # Unfolding and padding are linear maps of each image, so they commute with the sum
        # over the batch: one image's worth of patches is unfolded, not the batch's.
        x = x.abs().sum(0, keepdim=True)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            padding = module._reversed_padding_repeated_twice
            x = torch.nn.functional.pad(x, padding, mode="constant" if module.padding_mode == "zeros"
                                        else module.padding_mode)
            pad = 0
        else:
            pad = module.padding
        patches = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, pad, module.stride)
        return grad_out.abs().sum(dim=(0, 2, 3)), patches.sum(dim=(0, 2))
    x = x.reshape(-1, x.shape[-1])
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    return grad_out.abs().sum(0), x.abs().sum(0)
