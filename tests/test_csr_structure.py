"""The CSR structure rules (sparsemom_ext.csr_structure): a topology re-layout against a dense reference."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemom_ext as sm
from sparsemom_ext import ops, reference
from sparsemom_ext.csr_structure import csr_from_mask, flat_indices, relayout_plan, structure_from_flat

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


# ---------------------------------------------------------------- mask_matches_csr
@settings(max_examples=80, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(0, 300), seed=st.integers(0, 10_000),
       density=st.floats(0.0, 1.0), flips=st.integers(0, 3))
def test_property_mask_matches_csr_equals_the_reference(rows, cols, seed, density, flips):
    g = seeded(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    row_ptr, col_idx = csr_from_mask(mask)
    assert ops.mask_matches_csr(mask, row_ptr, col_idx)
    changed = mask.clone()
    for _ in range(flips if mask.numel() else 0):  # bits flipped where the structure is not rebuilt
        i = int(torch.randint(mask.numel(), (1,), generator=g))
        changed.view(-1)[i] ^= True
    expected = reference.mask_matches_csr(changed, row_ptr, col_idx)
    assert ops.mask_matches_csr(changed, row_ptr, col_idx) == expected == torch.equal(changed, mask)
    if cols:  # a strided view of the same contents
        wide = torch.zeros(rows, 2 * cols, dtype=torch.bool)
        wide[:, ::2] = changed
        assert ops.mask_matches_csr(wide[:, ::2], row_ptr, col_idx) == expected


def test_mask_matches_csr_agrees_at_one_and_two_threads():
    mask = torch.rand(3000, 257, generator=seeded(1)) < 0.05
    row_ptr, col_idx = csr_from_mask(mask)
    changed = mask.clone()
    changed[2999, 256] ^= True  # the last row: after every other thread's chunk
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert ops.mask_matches_csr(mask, row_ptr, col_idx)
            assert not ops.mask_matches_csr(changed, row_ptr, col_idx)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("edit,error,message", [
    (lambda m, rp, ci: (m.float(), rp, ci), TypeError, "mask must be a bool tensor"),
    (lambda m, rp, ci: (m[0], rp, ci), ValueError, "mask must be a dense 2-D tensor"),
    (lambda m, rp, ci: (m, rp[:-1], ci), ValueError, "row_ptr must have mask.size(0) + 1"),
    (lambda m, rp, ci: (m, rp.long(), ci), TypeError, "row_ptr must be int32"),
    (lambda m, rp, ci: (m, rp, ci.long()), TypeError, "col_idx must be int32"),
    (lambda m, rp, ci: (m, rp, torch.cat([ci[:1] * 0 - 1, ci[1:]])), ValueError, "col_idx must be in [0, "),
    (lambda m, rp, ci: (m, rp, torch.cat([ci[:1] * 0 + 6, ci[1:]])), ValueError, "col_idx must be in [0, "),
    (lambda m, rp, ci: (m, torch.cat([rp[:1], rp[1:] + 1]), ci), ValueError, "row_ptr must end at nnz"),
    (lambda m, rp, ci: (m, torch.tensor([0, 3, 2, 4], dtype=torch.int32), ci), ValueError,
     "row_ptr must be non-decreasing"),
    (lambda m, rp, ci: (m, rp, ci.flip(0)), ValueError, "col_idx must be strictly increasing within each row"),
])
def test_mask_matches_csr_names_a_bad_argument(edit, error, message):
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    row_ptr, col_idx = csr_from_mask(mask)
    assert row_ptr.tolist() == [0, 3, 3, 4]
    args = edit(mask, row_ptr, col_idx)
    with pytest.raises(error, match=re.escape(message)):
        ops.mask_matches_csr(*args)
