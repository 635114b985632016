"""The CSR structure rules (sparsemom_ext.csr_structure): a topology re-layout against a dense reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemom_ext as sm
from sparsemom_ext.csr_structure import flat_indices, relayout_plan, structure_from_flat

from conftest import seeded


# ---------------------------------------------------------------- re-layout
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), seed=st.integers(0, 10_000),
       density=st.floats(0.0, 1.0), keep_fraction=st.floats(0.0, 1.0))
def test_property_relayout_equals_dense_reference(rows, cols, seed, density, keep_fraction):
    g = seeded(seed)
    old_mask = torch.rand(rows, cols, generator=g) < density
    row_ptr, col_idx = sm.ops.csr_from_mask(old_mask)
    old_flat = flat_indices(row_ptr, col_idx, cols)
    keep = torch.rand(old_flat.numel(), generator=g) < keep_fraction
    kept_mask = torch.zeros(rows * cols, dtype=torch.bool)
    kept_mask[old_flat[keep]] = True
    free = (~kept_mask).nonzero().reshape(-1)
    grown_flat = free[torch.rand(free.numel(), generator=g) < 0.5]
    old_state = torch.randn(old_flat.numel(), generator=g, dtype=torch.float64)
    grown_fill = torch.randn(grown_flat.numel(), generator=g, dtype=torch.float64)

    plan = relayout_plan(old_flat, keep, grown_flat)
    new_row_ptr, new_col_idx = structure_from_flat(plan.flat, rows, cols)

    # Reference: scatter everything into dense matrices and read the new positions.
    new_mask = kept_mask.clone()
    new_mask[grown_flat] = True
    dense = torch.zeros(rows * cols, dtype=torch.float64)
    dense[old_flat[keep]] = old_state[keep]
    dense[grown_flat] = grown_fill
    assert torch.equal(sm.ops.csr_to_mask(new_row_ptr, new_col_idx, cols).reshape(-1), new_mask)
    assert torch.equal(plan.apply(old_state, grown_fill), dense[new_mask])
    zero_filled = dense.clone()
    zero_filled[grown_flat] = 0
    assert torch.equal(plan.apply(old_state), zero_filled[new_mask])
