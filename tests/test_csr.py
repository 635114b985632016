"""The CSR sparse-matmul ops (csr_spmm, csr_sddmm, csr_transpose, csr_linear,
csr_linear_backward) and the conversions against their pure-PyTorch references, over
devices x dtypes x structures x batch sizes; autograd, opcheck, bad input and
bit-identity of the CPU ISA variants."""

import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemom_ext as sm
from sparsemom_ext import ops, reference

from conftest import DEVICES, FLOAT_DTYPES, non_contiguous, run_opcheck

# Batch sizes: empty, one, a tail only, one exact 128-entry tile, two tiles + a tail.
BATCHES = [0, 1, 17, 128, 300]

STRUCTURES = ["random", "empty_rows", "nnz0", "n_rows0", "n_cols0", "dense", "skew", "unsorted_repeats"]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def make_structure(kind, device="cpu", seed=0):
    """(row_ptr, col_idx, n_cols) of one structure family, int32 on ``device``."""
    g = seeded(seed)
    if kind == "unsorted_repeats":
        # Column indices in no order, with repeats within rows (they add up).
        n_rows, n_cols = 12, 25
        lengths = torch.randint(0, 21, (n_rows,), generator=g).tolist()
        rows = [torch.randint(0, n_cols, (n,), generator=g) for n in lengths]
        rows[0] = torch.tensor([5, 5, 5, 1, 0, 5, 24])
        rows[1] = torch.tensor([], dtype=torch.int64)
        row_ptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).int()
        col_idx = torch.cat(rows).int()
        assert (col_idx[:7].diff() < 0).any()
        return row_ptr.to(device), col_idx.to(device), n_cols
    if kind == "random":
        mask = torch.rand(40, 57, generator=g) < 0.3
    elif kind == "empty_rows":
        mask = torch.rand(40, 57, generator=g) < 0.3
        mask[[0, 5, 6, 39]] = False  # first, last and two neighbouring rows empty
    elif kind == "nnz0":
        mask = torch.zeros(20, 30, dtype=torch.bool)
    elif kind == "n_rows0":
        mask = torch.zeros(0, 30, dtype=torch.bool)
    elif kind == "n_cols0":
        mask = torch.zeros(6, 0, dtype=torch.bool)
    elif kind == "dense":
        mask = torch.ones(24, 70, dtype=torch.bool)
    elif kind == "skew":
        # One row with 300 nonzeros, the others (nearly) empty.
        mask = torch.zeros(30, 300, dtype=torch.bool)
        mask[7] = True
        mask[20, ::50] = True
    else:
        raise AssertionError(kind)
    row_ptr, col_idx = ops.csr_from_mask(mask)
    return row_ptr.to(device), col_idx.to(device), mask.shape[1]


def randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def max_row_nnz(row_ptr):
    return int(row_ptr.diff().max()) if row_ptr.numel() > 1 else 0


def assert_sum_close(out, expected, abs_sum, n_terms):
    """``out`` and ``expected`` are two sums of the same ``n_terms`` products computed
    in any order in the dtype's opmath (float32, or float64 for float64) and rounded
    to the dtype; ``abs_sum`` is the sum of the products' magnitudes. Each sum is then
    within ``n_terms * u`` of the exact one relative to ``abs_sum`` (u: the opmath's
    unit roundoff) plus one rounding to the storage dtype."""
    dtype = out.dtype
    assert expected.dtype == dtype and out.shape == expected.shape
    u_op = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    u_store = torch.finfo(dtype).eps / 2
    tiny = torch.finfo(dtype).eps * torch.finfo(dtype).tiny  # subnormal spacing
    bound = (2 * (n_terms + 1) * u_op + 3 * u_store) * abs_sum.double().cpu() + tiny
    err = (out.double().cpu() - expected.double().cpu()).abs()
    assert torch.isfinite(out).all()
    worst = (err - bound).max() if err.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"max error {err.max():.3g} exceeds the bound (by {worst:.3g})"


def spmm_case(kind, batch, dtype, device, transposed, with_bias, seed=0):
    """The arguments of one csr_spmm call: the structure (or its transpose, sharing
    the CSR values through value_perm), x (batch, n_cols) and the optional bias."""
    g = seeded(seed + 1)
    row_ptr, col_idx, n_cols = make_structure(kind, device, seed)
    values = randn(col_idx.numel(), dtype, device, g)
    perm = None
    if transposed:
        n_rows = row_ptr.numel() - 1
        row_ptr, col_idx, perm = ops.csr_transpose(row_ptr, col_idx, n_cols)
        n_cols = n_rows
    x = randn((batch, n_cols), dtype, device, g)
    bias = randn(row_ptr.numel() - 1, dtype, device, g) if with_bias else None
    return x, row_ptr, col_idx, values, perm, bias


def check_spmm(x, row_ptr, col_idx, values, perm, bias):
    y = ops.csr_spmm(x, row_ptr, col_idx, values, perm, bias)
    n_rows, batch = row_ptr.numel() - 1, x.shape[0]
    assert y.shape == (batch, n_rows) and y.dtype == x.dtype and y.device == x.device
    # Feature-major: the transpose of a contiguous (n_rows, batch) tensor.
    assert y.t().is_contiguous()
    if y.numel():
        assert y.stride() == (1, batch)
    expected = reference.csr_spmm(x, row_ptr, col_idx, values, perm, bias)
    abs_sum = reference.csr_spmm(x.double().abs(), row_ptr, col_idx, values.double().abs(), perm,
                                 None if bias is None else bias.double().abs())
    assert_sum_close(y, expected, abs_sum, max_row_nnz(row_ptr) + 1)
    return y


# --------------------------------------------------------------------------- csr_spmm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["plain", "bias", "perm", "perm_bias"])
def test_csr_spmm_matches_reference(device, dtype, kind, batch, variant):
    check_spmm(*spmm_case(kind, batch, dtype, device, transposed="perm" in variant,
                          with_bias="bias" in variant))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 17, 300])
@pytest.mark.parametrize("x_layout", ["non_contiguous", "feature_major"])
def test_csr_spmm_any_x_strides(device, dtype, batch, x_layout):
    x, row_ptr, col_idx, values, perm, bias = spmm_case("empty_rows", batch, dtype, device, True, True)
    expected = ops.csr_spmm(x, row_ptr, col_idx, values, perm, bias)
    if x_layout == "non_contiguous":
        strided = non_contiguous(x)
    else:
        strided = x.t().contiguous().t()  # (in, batch) contiguous, seen as (batch, in)
    if batch > 1:
        assert not strided.is_contiguous()
    y = check_spmm(strided, row_ptr, col_idx, values, perm, bias)
    if device == "cpu":
        # The kernel reads a feature-major copy of x: the same bits whatever x's strides.
        assert torch.equal(y, expected)
    # Non-contiguous values and bias too.
    y2 = check_spmm(strided, row_ptr, col_idx, non_contiguous(values), perm, non_contiguous(bias))
    if device == "cpu":
        assert torch.equal(y2, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_csr_spmm_and_sddmm_split_skewed_rows_over_threads(dtype):
    # 64 rows x 2000 columns: one full row in the middle, a few short rows, the rest
    # empty; batch 128 gives enough work for the split by nonzeros to use 2 threads.
    g = seeded(3)
    mask = torch.zeros(64, 2000, dtype=torch.bool)
    mask[37] = True
    mask[[0, 10, 50, 63]] = torch.rand(4, 2000, generator=g) < 0.01
    row_ptr, col_idx = ops.csr_from_mask(mask)
    values = randn(col_idx.numel(), dtype, "cpu", g)
    x = randn((128, 2000), dtype, "cpu", g)
    dy = randn((128, 64), dtype, "cpu", g)
    bias = randn(64, dtype, "cpu", g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.csr_spmm(x, row_ptr, col_idx, values, None, bias)
        s1 = ops.csr_sddmm(dy, x, row_ptr, col_idx)
        torch.set_num_threads(2)
        y2 = check_spmm(x, row_ptr, col_idx, values, None, bias)
        s2 = ops.csr_sddmm(dy, x, row_ptr, col_idx)
    finally:
        torch.set_num_threads(threads)
    # Every output is summed by one thread in a fixed order: the thread count changes no bit.
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    abs_sum = reference.csr_sddmm(dy.double().abs(), x.double().abs(), row_ptr, col_idx)
    assert_sum_close(s2, reference.csr_sddmm(dy, x, row_ptr, col_idx), abs_sum, 128)


def test_csr_spmm_repeated_columns_add_up():
    row_ptr = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    col_idx = torch.tensor([2, 0, 2, 1, 1], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    x = torch.tensor([[1.0, 10.0, 100.0]])
    y = ops.csr_spmm(x, row_ptr, col_idx, values)
    assert y.tolist() == [[2.0 + 500.0, 0.0, 240.0]]
    assert torch.equal(ops.csr_to_dense(values, row_ptr, col_idx, 3),
                       torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.0, 0.0], [0.0, 24.0, 0.0]]))


# --------------------------------------------------------------------------- csr_sddmm
def sddmm_case(kind, batch, dtype, device, seed=0):
    g = seeded(seed + 2)
    row_ptr, col_idx, n_cols = make_structure(kind, device, seed)
    a = randn((batch, row_ptr.numel() - 1), dtype, device, g)
    b = randn((batch, n_cols), dtype, device, g)
    return a, b, row_ptr, col_idx


def check_sddmm(a, b, row_ptr, col_idx):
    out = ops.csr_sddmm(a, b, row_ptr, col_idx)
    assert out.shape == col_idx.shape and out.dtype == a.dtype and out.device == a.device
    assert out.is_contiguous()
    expected = reference.csr_sddmm(a, b, row_ptr, col_idx)
    abs_sum = reference.csr_sddmm(a.double().abs(), b.double().abs(), row_ptr, col_idx)
    assert_sum_close(out, expected, abs_sum, a.shape[0])
    return out


def _wide_structure(n_rows, n_cols, density, seed, shuffle=False):
    g = seeded(seed)
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    mask[3] = False  # an empty row
    row_ptr, col_idx = ops.csr_from_mask(mask)
    if shuffle:  # columns in no order within each row: chunks must still take every nonzero once
        for r in range(n_rows):
            a, b = int(row_ptr[r]), int(row_ptr[r + 1])
            col_idx[a:b] = col_idx[a:b][torch.randperm(b - a, generator=g)]
    return row_ptr, col_idx


# The CPU kernels take the columns of a wide, dense-enough matrix in L2-sized chunks
# (csr_cpu.cpp, kSpmmChunking: 512 KiB of the input tile, at least 8 nonzeros per row
# and chunk): 4096 columns x 128 batch lanes at density 0.15 is chunked (1024 columns
# per chunk, also at density 0.02: 20 per row and chunk), a 16-wide batch slice or
# density 0.00375 is not. 600 rows at density 0.15 go in several blocks of rows
# (256 each). Chunking must change no bit.
@pytest.mark.parametrize("n_rows", [40, 600])
@pytest.mark.parametrize("density", [0.15, 0.02])
@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
def test_cpu_column_chunking_changes_no_result(shuffle, density, n_rows):
    n_cols, batch = 4096, 160
    row_ptr, col_idx = _wide_structure(n_rows, n_cols, density, seed=1, shuffle=shuffle)
    g = seeded(2)
    values = torch.randn(col_idx.numel(), generator=g)
    bias = torch.randn(n_rows, generator=g)
    x, dy = torch.randn(batch, n_cols, generator=g), torch.randn(batch, n_rows, generator=g)
    y = ops.csr_spmm(x, row_ptr, col_idx, values, None, bias)
    torch.testing.assert_close(y, reference.csr_spmm(x, row_ptr, col_idx, values, None, bias),
                               rtol=1e-4, atol=1e-3)
    # Batch slices of 16 are not chunked; each output adds the same terms in the same order.
    sliced = torch.cat([ops.csr_spmm(x[i:i + 16], row_ptr, col_idx, values, None, bias)
                        for i in range(0, batch, 16)])
    assert torch.equal(y, sliced)
    # SDDMM: each nonzero's dot product is independent of the others, so a sparse subset
    # (too sparse to be chunked) must give the same bits at its positions.
    out = ops.csr_sddmm(dy, x, row_ptr, col_idx)
    torch.testing.assert_close(out, reference.csr_sddmm(dy, x, row_ptr, col_idx), rtol=1e-4, atol=1e-3)
    keep = torch.zeros(col_idx.numel(), dtype=torch.bool)
    keep[::40] = True
    rows = torch.repeat_interleave(torch.arange(n_rows), (row_ptr[1:] - row_ptr[:-1]).long())
    sub_ptr = torch.zeros(n_rows + 1, dtype=torch.int32)
    sub_ptr[1:] = torch.bincount(rows[keep], minlength=n_rows).cumsum(0)
    sub = ops.csr_sddmm(dy, x, sub_ptr, col_idx[keep])
    assert torch.equal(sub, out[keep])


# The float CPU kernels validate col_idx in the pass they make anyway (a row stops at
# a column out of range and the op raises); they must catch one anywhere: in the
# last or a middle chunk of a chunked matrix, in the batch's tail tile, first in a row
# or after valid ones, and with an empty batch (checked up front: no kernel pass).
@pytest.mark.parametrize("batch", [0, 16, 130])
@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("bad", [-1, 4096, 2**31 - 1, -2**31])
def test_cpu_kernels_catch_a_column_out_of_range_anywhere(batch, shuffle, bad):
    n_rows, n_cols = 40, 4096
    row_ptr, col_idx = _wide_structure(n_rows, n_cols, 0.15, seed=3, shuffle=shuffle)
    g = seeded(4)
    x, dy = torch.randn(batch, n_cols, generator=g), torch.randn(batch, n_rows, generator=g)
    values = torch.randn(col_idx.numel(), generator=g)
    for k in (0, int(row_ptr[7]) + 5, int(row_ptr[20]) + 300, col_idx.numel() - 1):
        broken = col_idx.clone()
        broken[k] = bad
        message = f"col_idx must be in [0, n_cols = {n_cols}), got col_idx[{k}]={bad}"
        with pytest.raises(ValueError, match=re.escape(message)):
            ops.csr_spmm(x, row_ptr, broken, values, None, None)
        with pytest.raises(ValueError, match=re.escape(message)):
            ops.csr_sddmm(dy, x, row_ptr, broken)
    # The same structure unbroken goes through.
    assert ops.csr_spmm(x, row_ptr, col_idx, values, None, None).shape == (batch, n_rows)


def test_cpu_value_perm_out_of_range_is_caught_by_the_gather():
    row_ptr, col_idx = _wide_structure(40, 4096, 0.15, seed=5)
    col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, 4096)
    values = torch.randn(col_idx.numel())
    dy = torch.randn(8, 40)
    nnz = perm.numel()
    for k, bad in ((0, -1), (nnz // 2, nnz), (nnz - 1, 2**31 - 1)):
        broken = perm.clone()
        broken[k] = bad
        with pytest.raises(ValueError, match=re.escape(f"value_perm must be in [0, nnz = {nnz}), "
                                                       f"got value_perm[{k}]={bad}")):
            ops.csr_spmm(dy, col_ptr, row_idx, values, broken, None)


# On CUDA a content check costs a host sync, so the ops check a structure once per
# topology (csrc/structure_memo.cpp) and derive its row order once: a write into the
# structure's tensors must be seen by the next call, on every device.
@pytest.mark.parametrize("device", DEVICES)
def test_a_structure_written_in_place_is_checked_again(device):
    x, row_ptr, col_idx, values, perm, _ = spmm_case("random", 9, torch.float32, device,
                                                     transposed=True, with_bias=False)
    n_rows, n_cols = row_ptr.numel() - 1, x.shape[1]
    dy = torch.randn(9, n_rows, generator=seeded(7)).to(device)
    check_spmm(x, row_ptr, col_idx, values, perm, None)
    check_sddmm(dy, x, row_ptr, col_idx)
    col_message = re.escape(f"col_idx must be in [0, n_cols = {n_cols})")
    for tensor, k, bad, message in ((col_idx, 5, n_cols, col_message),
                                    (col_idx, -1, -1, col_message),
                                    (perm, 3, perm.numel(), "value_perm must be in"),
                                    (row_ptr, -1, col_idx.numel() + 1, "row_ptr must end at nnz")):
        good = int(tensor[k])
        tensor[k] = bad  # in place: the same tensors as the calls above
        with pytest.raises(ValueError, match=message):
            ops.csr_spmm(x, row_ptr, col_idx, values, perm, None)
        if tensor is not perm:
            with pytest.raises(ValueError, match=message):
                ops.csr_sddmm(dy, x, row_ptr, col_idx)
        tensor[k] = good
        check_spmm(x, row_ptr, col_idx, values, perm, None)


@pytest.mark.parametrize("device", DEVICES)
def test_a_structure_replaced_in_place_gives_the_new_result(device):
    # Same shape and nnz, rows of other lengths: nothing derived from the first
    # structure (its check, its row order) may be used for the second.
    mask = torch.rand(30, 200, generator=seeded(8)) < 0.05
    mask[2] = True
    first, second = ops.csr_from_mask(mask), ops.csr_from_mask(mask.flip(0))
    row_ptr, col_idx = first[0].to(device), first[1].to(device)
    g = seeded(9)
    values = torch.randn(col_idx.numel(), generator=g).to(device)
    x = torch.randn(16, 200, generator=g).to(device)
    dy = torch.randn(16, 30, generator=g).to(device)
    check_spmm(x, row_ptr, col_idx, values, None, None)
    row_ptr.copy_(second[0])
    col_idx.copy_(second[1])
    check_spmm(x, row_ptr, col_idx, values, None, None)
    check_sddmm(dy, x, row_ptr, col_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("batch", BATCHES)
def test_csr_sddmm_matches_reference(device, dtype, kind, batch):
    out = check_sddmm(*sddmm_case(kind, batch, dtype, device))
    if batch == 0:
        assert not out.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 17, 300])
def test_csr_sddmm_non_contiguous_operands(device, dtype, batch):
    a, b, row_ptr, col_idx = sddmm_case("unsorted_repeats", batch, dtype, device)
    expected = ops.csr_sddmm(a, b, row_ptr, col_idx)
    for a2, b2 in [(non_contiguous(a), non_contiguous(b)),
                   (a.t().contiguous().t(), b.t().contiguous().t())]:
        out = check_sddmm(a2, b2, row_ptr, col_idx)
        if device == "cpu":
            assert torch.equal(out, expected)


# --------------------------------------------------------------------------- csr_transpose
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", STRUCTURES)
def test_csr_transpose_matches_reference_exactly(device, kind):
    row_ptr, col_idx, n_cols = make_structure(kind, device)
    ours = ops.csr_transpose(row_ptr, col_idx, n_cols)
    theirs = reference.csr_transpose(row_ptr, col_idx, n_cols)
    for name, a, b in zip(("col_ptr", "row_idx", "perm"), ours, theirs):
        assert a.dtype == torch.int32 and a.device == row_ptr.device, name
        assert torch.equal(a, b), name
    assert ours[0].shape == (n_cols + 1,)


@settings(max_examples=150, deadline=None)
@given(n_rows=st.integers(0, 20), n_cols=st.integers(0, 20), density=st.floats(0.0, 1.0),
       shuffle=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_csr_transpose_property_describes_the_transposed_matrix(n_rows, n_cols, density, shuffle, seed):
    g = seeded(seed)
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    dense = torch.randn(n_rows, n_cols, generator=g) * mask
    row_ptr, col_idx = ops.csr_from_mask(mask)
    if shuffle:  # column order within each row is free
        bounds = zip(row_ptr[:-1].tolist(), row_ptr[1:].tolist())
        order = torch.cat([torch.zeros(0, dtype=torch.int64)] +
                          [s + torch.randperm(e - s, generator=g) for s, e in bounds])
        col_idx = col_idx[order]
    values = ops.csr_values_from_dense(dense, row_ptr, col_idx)
    col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, n_cols)
    nnz = col_idx.numel()
    assert col_ptr.shape == (n_cols + 1,) and row_idx.shape == perm.shape == (nnz,)
    assert col_ptr[0] == 0 and col_ptr[-1] == nnz and (col_ptr.diff() >= 0).all()
    # (col_ptr, row_idx) is exactly the transposed mask ...
    assert torch.equal(ops.csr_to_mask(col_ptr, row_idx, n_rows), mask.t())
    # ... with the rows strictly increasing within each column ...
    bounds = col_ptr.tolist()
    for c in range(n_cols):
        assert (row_idx[bounds[c]:bounds[c + 1]].diff() > 0).all()
    # ... perm is a permutation of the CSR positions ...
    assert torch.equal(perm.sort().values, torch.arange(nnz, dtype=torch.int32))
    col_of_each = torch.repeat_interleave(torch.arange(n_cols), col_ptr.diff().long())
    assert torch.equal(col_idx[perm.long()].long(), col_of_each)
    # ... and values[perm] are the values of the transposed matrix in CSC order.
    assert torch.equal(values[perm.long()], dense.t()[mask.t()])


# --------------------------------------------------------------------------- conversions
def conversion_masks():
    g = seeded(5)
    yield torch.rand(13, 29, generator=g) < 0.3
    yield torch.zeros(7, 5, dtype=torch.bool)
    yield torch.ones(4, 9, dtype=torch.bool)
    yield torch.zeros(0, 6, dtype=torch.bool)
    yield torch.zeros(3, 0, dtype=torch.bool)
    m = torch.rand(20, 8, generator=g) < 0.5
    m[[0, 7, 19]] = False
    yield m


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", list(conversion_masks()),
                         ids=lambda m: "x".join(map(str, m.shape)) + f"_{int(m.sum())}")
def test_conversions_match_torch_and_round_trip(device, mask):
    mask = mask.to(device)
    row_ptr, col_idx = ops.csr_from_mask(mask)
    assert row_ptr.dtype == col_idx.dtype == torch.int32
    csr = mask.to(torch.int8).to_sparse_csr()
    assert torch.equal(row_ptr.long(), csr.crow_indices())
    assert torch.equal(col_idx.long(), csr.col_indices())
    assert torch.equal(ops.csr_to_mask(row_ptr, col_idx, mask.shape[1]), mask)
    weight = torch.randn(mask.shape, generator=seeded(6)).to(device)
    values = ops.csr_values_from_dense(weight, row_ptr, col_idx)
    assert torch.equal(values, weight[mask])
    assert torch.equal(ops.csr_to_dense(values, row_ptr, col_idx, mask.shape[1]), weight.masked_fill(~mask, 0))


def test_csr_from_mask_rejects_non_bool_or_non_2d():
    with pytest.raises(ValueError, match="mask must be a 2-D bool tensor"):
        ops.csr_from_mask(torch.ones(3, 4))
    with pytest.raises(ValueError, match="mask must be a 2-D bool tensor"):
        ops.csr_from_mask(torch.ones(3, dtype=torch.bool))


# --------------------------------------------------------------------------- csr_linear_backward
def backward_case(kind, batch, dtype, device, seed=0):
    """csr_linear_backward's arguments: (grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm)."""
    g = seeded(seed + 4)
    row_ptr, col_idx, n_in = make_structure(kind, device, seed)
    values = randn(col_idx.numel(), dtype, device, g)
    grad = randn((batch, row_ptr.numel() - 1), dtype, device, g)
    x = randn((batch, n_in), dtype, device, g)
    return (grad, x, values, row_ptr, col_idx, *ops.csr_transpose(row_ptr, col_idx, n_in))


def check_backward(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm):
    """The fused op gives the bits of the two ops it fuses (the same sums in the same
    order), in their layouts; and those are right (against the dense reference)."""
    args = (grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm)
    grad_x, grad_values = ops.csr_linear_backward(*args)
    assert torch.equal(grad_x, ops.csr_spmm(grad, col_ptr, row_idx, values, perm, None))
    assert torch.equal(grad_values, ops.csr_sddmm(grad, x, row_ptr, col_idx))
    assert grad_x.shape == x.shape and grad_x.dtype == x.dtype and grad_x.t().is_contiguous()
    assert grad_values.shape == values.shape and grad_values.is_contiguous()
    expected_x, expected_values = reference.csr_linear_backward(*args)
    abs_x = reference.csr_spmm(grad.double().abs(), col_ptr, row_idx, values.double().abs(), perm)
    assert_sum_close(grad_x, expected_x, abs_x, max_row_nnz(col_ptr) + 1)
    abs_values = reference.csr_sddmm(grad.double().abs(), x.double().abs(), row_ptr, col_idx)
    assert_sum_close(grad_values, expected_values, abs_values, grad.shape[0])
    return grad_x, grad_values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("batch", BATCHES)
def test_csr_linear_backward_is_the_two_ops_it_fuses(device, dtype, kind, batch):
    check_backward(*backward_case(kind, batch, dtype, device))


# The fused CPU kernel walks the transposed structure, chunking its columns (W's rows)
# like the SpMM. At density 0.15 (kBackwardChunking: 512 columns per chunk at 128
# lanes, blocks of 256 rows) W of 4096 rows x 40 columns, batch 130 (a full tile and a
# tail), is chunked, with 1100 columns in several blocks; at 0.02 (kSparseBackwardChunking:
# 1024 columns per chunk, blocks of 1024 rows) too. W.T's shape and batch slices of 16
# are not chunked.
@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("density", [0.15, 0.02])
@pytest.mark.parametrize("shape", [(4096, 40), (4096, 1100), (40, 4096)],
                         ids=["chunked", "chunked-blocks", "unchunked"])
def test_csr_linear_backward_on_wide_layers(shape, density, shuffle):
    n_out, n_in = shape
    row_ptr, col_idx = _wide_structure(n_out, n_in, density, seed=6, shuffle=shuffle)
    g = seeded(7)
    values = torch.randn(col_idx.numel(), generator=g)
    grad, x = torch.randn(130, n_out, generator=g), torch.randn(130, n_in, generator=g)
    check_backward(grad, x, values, row_ptr, col_idx, *ops.csr_transpose(row_ptr, col_idx, n_in))


@settings(max_examples=25, deadline=None)
@given(n_out=st.integers(0, 70), n_in=st.integers(0, 70), batch=st.integers(0, 140),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_csr_linear_backward_property(n_out, n_in, batch, density, seed):
    g = seeded(seed)
    row_ptr, col_idx = ops.csr_from_mask(torch.rand(n_out, n_in, generator=g) < density)
    values = torch.randn(col_idx.numel(), generator=g)
    grad, x = torch.randn(batch, n_out, generator=g), torch.randn(batch, n_in, generator=g)
    grad_x, _ = check_backward(grad, x, values, row_ptr, col_idx, *ops.csr_transpose(row_ptr, col_idx, n_in))
    # An input feature that no nonzero reads gets exactly zero.
    unread = torch.bincount(col_idx.long(), minlength=n_in) == 0
    assert not grad_x[:, unread].any()


# Broken transposed structures: the fused CPU kernel validates row_idx and perm in its
# pass (a bad entry anywhere, also in a chunked walk) and col_ptr up front.
@pytest.mark.parametrize("batch", [16, 130])
@pytest.mark.parametrize("shape", [(4096, 40), (40, 4096)], ids=["chunked", "unchunked"])
def test_csr_linear_backward_catches_a_broken_transpose(shape, batch):
    n_out, n_in = shape
    row_ptr, col_idx = _wide_structure(n_out, n_in, 0.15, seed=8)
    col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, n_in)
    g = seeded(9)
    values = torch.randn(col_idx.numel(), generator=g)
    grad, x = torch.randn(batch, n_out, generator=g), torch.randn(batch, n_in, generator=g)
    nnz = col_idx.numel()
    for k in (0, nnz // 2, nnz - 1):
        for bad in (-1, n_out):
            broken = row_idx.clone()
            broken[k] = bad
            with pytest.raises(ValueError, match=re.escape(
                    f"row_idx must be in [0, out_features = {n_out}), got row_idx[{k}]={bad}")):
                ops.csr_linear_backward(grad, x, values, row_ptr, col_idx, col_ptr, broken, perm)
        for bad in (-1, nnz, 2**31 - 1):
            broken = perm.clone()
            broken[k] = bad
            with pytest.raises(ValueError, match=re.escape(f"perm must be in [0, nnz = {nnz}), got perm[{k}]={bad}")):
                ops.csr_linear_backward(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, broken)
    broken = col_ptr.clone()
    broken[5] = broken[6] + 1
    with pytest.raises(ValueError, match=re.escape("col_ptr must be non-decreasing, got col_ptr[5]=")):
        ops.csr_linear_backward(grad, x, values, row_ptr, col_idx, broken, row_idx, perm)
    broken = col_ptr.clone()
    broken[-1] = nnz - 1
    with pytest.raises(ValueError, match=re.escape(f"col_ptr must end at nnz = {nnz}, got col_ptr[-1]={nnz - 1}")):
        ops.csr_linear_backward(grad, x, values, row_ptr, col_idx, broken, row_idx, perm)
    # Unbroken, it goes through.
    check_backward(grad, x, values, row_ptr, col_idx, col_ptr, row_idx, perm)


# --------------------------------------------------------------------------- csr_linear
def linear_structure(device="cpu"):
    """7 x 9 with empty rows (first, middle and last) and a repeated column."""
    row_ptr = torch.tensor([0, 0, 3, 3, 6, 7, 9, 9], dtype=torch.int32, device=device)
    col_idx = torch.tensor([8, 0, 4, 1, 1, 2, 5, 3, 6], dtype=torch.int32, device=device)
    return (row_ptr, col_idx, *ops.csr_transpose(row_ptr, col_idx, 9))


@pytest.mark.parametrize("x_shape", [(5, 9), (2, 3, 9), (9,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr_linear_gradcheck(x_shape, with_bias):
    structure = linear_structure()
    g = seeded(8)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, values) + ((bias,) if with_bias else ())

    def fn(x, values, bias=None):
        return ops.csr_linear(x, values, bias, *structure)

    assert fn(*inputs).shape == x_shape[:-1] + (7,)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape", [(37, 80), (2, 3, 80)])
def test_csr_linear_forward_backward_equal_f_linear(device, x_shape):
    g = seeded(9)
    mask = torch.rand(50, 80, generator=g) < 0.3
    mask[[3, 4, 49]] = False
    row_ptr, col_idx = (t.to(device) for t in ops.csr_from_mask(mask))
    structure = (row_ptr, col_idx, *ops.csr_transpose(row_ptr, col_idx, 80))
    values = torch.randn(col_idx.numel(), generator=g).to(device).requires_grad_()
    bias = torch.randn(50, generator=g).to(device).requires_grad_()
    x = torch.randn(x_shape, generator=g).to(device).requires_grad_()
    grad_y = torch.randn(x_shape[:-1] + (50,), generator=g).to(device)

    y = ops.csr_linear(x, values, bias, *structure)
    y.backward(grad_y)

    weight = ops.csr_to_dense(values.detach(), row_ptr, col_idx, 80).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, weight, bias_ref)
    y_ref.backward(grad_y)

    batch = x.numel() // 80
    x2, gy2 = x.detach().reshape(batch, 80), grad_y.reshape(batch, 50)
    abs_y = gy2.new_zeros(()) + x2.abs() @ weight.detach().abs().t() + bias.detach().abs()
    assert_sum_close(y.reshape(batch, 50), y_ref.detach().reshape(batch, 50), abs_y, 80)
    assert_sum_close(x.grad.reshape(batch, 80), x_ref.grad.reshape(batch, 80),
                     gy2.abs() @ weight.detach().abs(), 50)
    # The values' gradient is the dense weight's gradient at the active positions.
    assert_sum_close(values.grad, weight.grad[mask.to(device)], (gy2.abs().t() @ x2.abs())[mask.to(device)], batch)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_major", "feature_major"])
def test_csr_linear_gives_the_input_gradient_in_the_input_layout(device, layout):
    # A row-major input goes through transpose_contiguous, whose backward hands the
    # gradient back row-major; a feature-major one is read as it is and its gradient
    # is feature-major: either way autograd keeps it as it comes (no strided copy).
    structure = tuple(t.to(device) for t in linear_structure())
    g = seeded(15)
    base = torch.randn(6, 9, generator=g).to(device)
    x = (base if layout == "row_major" else base.t().contiguous().t()).requires_grad_()
    values = torch.randn(9, generator=g).to(device)
    grad_y = torch.randn(6, 7, generator=g).to(device)
    ops.csr_linear(x, values, None, *structure).backward(grad_y)
    assert x.grad.stride() == x.stride()
    weight = ops.csr_to_dense(values, *structure[:2], 9)
    torch.testing.assert_close(x.grad, grad_y @ weight)


@pytest.mark.parametrize("device", DEVICES)
def test_csr_linear_empty_batch_backward(device):
    structure = tuple(t.to(device) for t in linear_structure())
    x = torch.zeros(0, 9, device=device, requires_grad=True)
    values = torch.randn(9, device=device, requires_grad=True)
    bias = torch.randn(7, device=device, requires_grad=True)
    y = ops.csr_linear(x, values, bias, *structure)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert x.grad.shape == (0, 9)
    assert torch.equal(values.grad, torch.zeros(9, device=device))
    assert torch.equal(bias.grad, torch.zeros(7, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wants", ["x_and_values", "values", "x"])
def test_csr_linear_reads_the_used_slots_and_gives_idle_slots_zero_gradient(device, wants):
    # A CsrLinear passes all its value slots; those past nnz are idle.
    structure = tuple(t.to(device) for t in linear_structure())
    g = seeded(19)
    exact = torch.randn(9, generator=g).to(device)
    slots = torch.cat([exact, torch.full((5,), 7.0, device=device)])  # idle slots must not be read
    x = torch.randn(6, 9, generator=g).to(device)
    grad_y = torch.randn(6, 7, generator=g).to(device)
    results = []
    for values in (exact, slots):
        v = values.clone().requires_grad_(wants != "x")
        xr = x.clone().requires_grad_(wants != "values")
        y = ops.csr_linear(xr, v, None, *structure)
        y.backward(grad_y)
        results.append((y, xr.grad, v.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    if wants != "values":
        torch.testing.assert_close(results[1][1], results[0][1])
    if wants != "x":
        assert results[1][2].shape == (14,)
        torch.testing.assert_close(results[1][2][:9], results[0][2])
        assert not results[1][2][9:].any()
    grad_x, grad_values = ops.csr_linear_backward(grad_y, x, slots, *structure)
    expected_x, expected_values = reference.csr_linear_backward(grad_y, x, slots, *structure)
    torch.testing.assert_close(grad_x, expected_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_values, expected_values, rtol=1e-5, atol=1e-5)
    assert grad_values.shape == (14,) and not grad_values[9:].any()
    with pytest.raises(ValueError, match="values must be 1-D with one entry per nonzero"):
        ops.csr_linear(x, exact[:8], None, *structure)


# --------------------------------------------------------------------------- masked_linear
def masked_weight(device="cpu", g=None, dtype=torch.float32):
    """A 7 x 9 dense weight, zero off a canonical structure, and the structure's flat indices."""
    g = g or seeded(16)
    mask = torch.rand(7, 9, generator=g) < 0.4
    mask[[0, 3]] = False  # empty rows
    weight = (torch.randn(7, 9, generator=g) * mask).to(dtype).to(device)
    return weight, mask.reshape(-1).nonzero().reshape(-1).to(device)


def masked_structure(weight):
    row_ptr, col_idx = ops.csr_from_mask(weight != 0)
    return (row_ptr, col_idx, *ops.csr_transpose(row_ptr, col_idx, weight.shape[1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape", [(5, 9), (2, 3, 9), (0, 9)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["row_major", "feature_major"])
def test_masked_linear_matches_reference(device, x_shape, with_bias, layout):
    g = seeded(17)
    weight, flat_index = masked_weight(device, g)
    structure = masked_structure(weight)
    base = torch.randn(x_shape, generator=g).to(device)
    if layout == "feature_major" and len(x_shape) == 2:
        base = base.t().contiguous().t()
    bias = torch.randn(7, generator=g).to(device) if with_bias else None
    grad_y = torch.randn(x_shape[:-1] + (7,), generator=g).to(device)
    results = []
    for fn in (ops.masked_linear, reference.masked_linear):
        x = base.clone().requires_grad_() if layout == "row_major" else base.detach().requires_grad_()
        w = weight.clone().requires_grad_()
        b = None if bias is None else bias.clone().requires_grad_()
        y = fn(x, w, b, *structure, flat_index)
        y.backward(grad_y)
        results.append((y, x.grad, w.grad, None if b is None else b.grad))
        if fn is ops.masked_linear and x.numel():
            assert x.grad.stride() == x.stride()  # the input's own layout, no strided copy
    for name, a, b in zip(("y", "x.grad", "weight.grad", "bias.grad"), *results):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # The weight gradient is dense: inactive positions get theirs too.
    inactive = weight == 0
    if base.numel():
        assert results[0][2][inactive].abs().sum() > 0


def test_masked_linear_gradcheck():
    weight, flat_index = masked_weight(dtype=torch.float64)
    structure = masked_structure(weight)
    g = seeded(18)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    # Off the structure the weight does not enter the forward, so gradcheck compares the
    # active entries' gradient; the dense part is checked against the reference above.
    def fn(x, active, bias):
        w = torch.zeros(63, dtype=torch.float64).index_put((flat_index,), active).reshape(7, 9)
        return ops.masked_linear(x, w, bias, *structure, flat_index)
    assert torch.autograd.gradcheck(fn, (x, weight.reshape(-1)[flat_index].clone().requires_grad_(), bias))


def test_masked_linear_rejects_arguments_that_disagree():
    weight, flat_index = masked_weight()
    structure = masked_structure(weight)
    x = torch.randn(4, 9)
    with pytest.raises(ValueError, match="flat_index must be int64 with one entry per nonzero"):
        ops.masked_linear(x, weight, None, *structure, flat_index[:-1])
    with pytest.raises(ValueError, match="flat_index must be int64"):
        ops.masked_linear(x, weight, None, *structure, flat_index.int())
    with pytest.raises(ValueError, match="x must be"):
        ops.masked_linear(torch.randn(4, 8), weight, None, *structure, flat_index)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.masked_linear(x, weight[:6], None, *structure, flat_index)


# --------------------------------------------------------------------------- transpose_contiguous
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int8, torch.bool, torch.complex128], ids=str)
@pytest.mark.parametrize("layout", ["row_major", "feature_major", "strided", "sliced"])
@pytest.mark.parametrize("shape", [(128, 300), (33, 65), (1, 7), (0, 5)])
def test_transpose_contiguous_matches_torch(device, dtype, layout, shape):
    g = seeded(13)
    base = (torch.randn(shape, generator=g) * 50).to(dtype).to(device)
    padded = torch.zeros((2 * shape[0], shape[1] + 3), dtype=dtype, device=device)
    padded[::2, 1:-2] = base
    x = {"row_major": base, "feature_major": base.t().contiguous().t(), "strided": non_contiguous(base),
         "sliced": padded[::2, 1:-2]}[layout]
    assert torch.equal(x, base)
    out = torch.ops.sparsemom.transpose_contiguous(x)
    assert out.is_contiguous() and out.dtype == dtype and out.device == x.device
    assert torch.equal(out, base.t())
    if out.numel() > 0:
        assert out.data_ptr() != x.data_ptr()  # always a new tensor, never a view of x


# 4-byte elements in whole 32 x 32 blocks go through the CPU's vector-register transpose:
# it moves bits, so every float32 bit pattern (NaN payloads, signalling NaNs, -0.0,
# subnormals) comes out unchanged, whatever the ISA (SPARSEMOM_CPU_ISA caps it).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 96), (96, 4096 + 5)])
def test_transpose_contiguous_moves_float32_bits_exactly(device, shape):
    bits = torch.randint(-2**31, 2**31 - 1, shape, generator=seeded(15), dtype=torch.int32)
    bits[0, :4] = torch.tensor([0x7FA00001, 0x7FC12345, -2**31, 1], dtype=torch.int32)  # sNaN, qNaN, -0.0, subnormal
    x = bits.view(torch.float32).to(device)
    out = torch.ops.sparsemom.transpose_contiguous(x)
    assert torch.equal(out.view(torch.int32).cpu(), bits.t())


def test_transpose_contiguous_gradient_comes_back_in_the_input_layout():
    g = seeded(14)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.sparsemom.transpose_contiguous, (x,))
    weights = torch.randn(9, 6, generator=g, dtype=torch.float64)
    (torch.ops.sparsemom.transpose_contiguous(x) * weights).sum().backward()
    assert torch.equal(x.grad, weights.t()) and x.grad.is_contiguous()


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_transpose_contiguous_rejects_other_than_2d(shape):
    with pytest.raises(ValueError, match=re.escape(f"x must be 2-D, got shape [{', '.join(map(str, shape))}]")):
        torch.ops.sparsemom.transpose_contiguous(torch.zeros(shape))


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    g = seeded(10)
    row_ptr, col_idx, col_ptr, row_idx, perm = (t.to(device) for t in linear_structure())
    r = lambda *shape, dtype=torch.float32: torch.randn(shape, generator=g, dtype=dtype).to(device)  # noqa: E731
    values = r(9)
    yield torch.ops.sparsemom.csr_spmm.default, (r(5, 9), row_ptr, col_idx, values, None, None)
    yield torch.ops.sparsemom.csr_spmm.default, (r(130, 9), row_ptr, col_idx, values, None, r(7))
    # The transposed structure, reading the CSR values through value_perm: dy @ W.
    yield torch.ops.sparsemom.csr_spmm.default, (r(3, 7), col_ptr, row_idx, values, perm, r(9))
    yield torch.ops.sparsemom.csr_spmm.default, (r(0, 7), col_ptr, row_idx, values, perm, None)
    yield torch.ops.sparsemom.csr_sddmm.default, (r(6, 7), r(6, 9), row_ptr, col_idx)
    yield torch.ops.sparsemom.csr_transpose.default, (row_ptr, col_idx, 9)
    yield torch.ops.sparsemom.transpose_contiguous.default, (r(5, 9).requires_grad_(),)
    yield torch.ops.sparsemom.csr_linear.default, (
        r(4, 9).requires_grad_(), values.clone().requires_grad_(), r(7).requires_grad_(),
        row_ptr, col_idx, col_ptr, row_idx, perm)
    yield torch.ops.sparsemom.csr_linear_backward.default, (
        r(6, 7), r(6, 9), values, row_ptr, col_idx, col_ptr, row_idx, perm)
    yield torch.ops.sparsemom.csr_linear_backward.default, (
        r(130, 7).t().contiguous().t(), r(130, 9), values, row_ptr, col_idx, col_ptr, row_idx, perm)
    f64 = torch.float64
    yield torch.ops.sparsemom.csr_linear.default, (
        r(4, 9, dtype=f64).requires_grad_(), r(9, dtype=f64).requires_grad_(), None,
        row_ptr, col_idx, col_ptr, row_idx, perm)
    yield torch.ops.sparsemom.csr_linear.default, (  # idle value slots past the nnz
        r(4, 9).requires_grad_(), r(12).requires_grad_(), None, row_ptr, col_idx, col_ptr, row_idx, perm)
    yield torch.ops.sparsemom.csr_linear_backward.default, (
        r(6, 7), r(6, 9), r(12), row_ptr, col_idx, col_ptr, row_idx, perm)
    weight, flat_index = masked_weight(device, g)
    structure = masked_structure(weight)
    yield torch.ops.sparsemom.masked_linear.default, (
        r(4, 9).requires_grad_(), weight.requires_grad_(), r(7).requires_grad_(), *structure, flat_index)
    yield torch.ops.sparsemom.masked_linear.default, (
        r(3, 9, dtype=f64), weight.detach().double().requires_grad_(), None, *structure, flat_index)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    assert run_opcheck(_opcheck_samples(device)) == 15


# --------------------------------------------------------------------------- bad input
def spmm_args(**override):
    g = seeded(11)
    args = dict(x=torch.randn(4, 6, generator=g),
                row_ptr=torch.tensor([0, 2, 2, 5], dtype=torch.int32),
                col_idx=torch.tensor([0, 5, 1, 2, 3], dtype=torch.int32),
                values=torch.randn(5, generator=g), value_perm=None, bias=torch.randn(3, generator=g))
    args.update(override)
    return args


def sddmm_args(**override):
    g = seeded(12)
    args = dict(a=torch.randn(4, 3, generator=g), b=torch.randn(4, 6, generator=g),
                row_ptr=torch.tensor([0, 2, 2, 5], dtype=torch.int32),
                col_idx=torch.tensor([0, 5, 1, 2, 3], dtype=torch.int32))
    args.update(override)
    return args


def transpose_args(**override):
    args = dict(row_ptr=torch.tensor([0, 2, 2, 5], dtype=torch.int32),
                col_idx=torch.tensor([0, 5, 1, 2, 3], dtype=torch.int32), n_cols=6)
    args.update(override)
    return args


def backward_args(**override):
    g = seeded(13)
    row_ptr = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    col_idx = torch.tensor([0, 5, 1, 2, 3], dtype=torch.int32)
    col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, 6)
    args = dict(grad=torch.randn(4, 3, generator=g), x=torch.randn(4, 6, generator=g),
                values=torch.randn(5, generator=g), row_ptr=row_ptr, col_idx=col_idx,
                col_ptr=col_ptr, row_idx=row_idx, perm=perm)
    args.update(override)
    return args


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


# Bad structures, each given to all three ops.
BAD_STRUCTURES = [
    # (row_ptr, col_idx, exception, words)
    (i32(0, 3, 2, 5), i32(0, 5, 1, 2, 3), ValueError, ["row_ptr", "non-decreasing"]),
    (i32(1, 2, 2, 5), i32(0, 5, 1, 2, 3), ValueError, ["row_ptr", "start at 0"]),
    (i32(0, 2, 2, 4), i32(0, 5, 1, 2, 3), ValueError, ["row_ptr", "end at nnz"]),
    (i32(0, 2, 2, 6), i32(0, 5, 1, 2, 3), ValueError, ["row_ptr", "end at nnz"]),
    (i32(0, 2, 2, 5), i32(0, 5, -1, 2, 3), ValueError, ["col_idx", "[0, n_cols = 6)"]),
    (i32(0, 2, 2, 5), i32(0, 6, 1, 2, 3), ValueError, ["col_idx", "[0, n_cols = 6)"]),
    (torch.tensor([0, 2, 2, 5]), i32(0, 5, 1, 2, 3), TypeError, ["row_ptr", "int32"]),
    (i32(0, 2, 2, 5), torch.tensor([0, 5, 1, 2, 3]), TypeError, ["col_idx", "int32"]),
    (i32(0, 2, 2, 5).reshape(1, 4), i32(0, 5, 1, 2, 3), ValueError, ["row_ptr", "1-D"]),
]

BAD_CALLS = [
    (ops.csr_spmm, spmm_args(value_perm=i32(0, 1, 5, 3, 4)), ValueError, ["value_perm", "[0, nnz = 5)"]),
    (ops.csr_spmm, spmm_args(value_perm=i32(0, 1, -1, 3, 4)), ValueError, ["value_perm", "[0, nnz = 5)"]),
    (ops.csr_spmm, spmm_args(value_perm=i32(0, 1, 2, 3)), ValueError, ["value_perm", "one entry per nonzero"]),
    (ops.csr_spmm, spmm_args(value_perm=torch.arange(5)), TypeError, ["value_perm", "int32"]),
    (ops.csr_spmm, spmm_args(values=torch.randn(5, dtype=torch.float64)), TypeError, ["values", "dtype of x"]),
    (ops.csr_spmm, spmm_args(values=torch.randn(4)), ValueError, ["values", "one entry per nonzero"]),
    (ops.csr_spmm, spmm_args(values=torch.randn(5, 1)), ValueError, ["values", "1-D"]),
    (ops.csr_spmm, spmm_args(values=torch.arange(5)), TypeError, ["values", "float"]),
    (ops.csr_spmm, spmm_args(bias=torch.randn(4)), ValueError, ["bias", "(n_rows,) = (3,)"]),
    (ops.csr_spmm, spmm_args(bias=torch.randn(3, 1)), ValueError, ["bias", "(n_rows,) = (3,)"]),
    (ops.csr_spmm, spmm_args(bias=torch.randn(3).half()), TypeError, ["bias", "dtype of x"]),
    (ops.csr_spmm, spmm_args(x=torch.randn(6)), ValueError, ["x must be 2-D"]),
    (ops.csr_spmm, spmm_args(x=torch.randn(2, 4, 6)), ValueError, ["x must be 2-D"]),
    (ops.csr_spmm, spmm_args(x=torch.ones(4, 6, dtype=torch.int32)), TypeError, ["x", "float"]),
    (ops.csr_spmm, spmm_args(x=torch.randn(4, 5)), ValueError, ["col_idx", "[0, n_cols = 5)"]),
    (ops.csr_sddmm, sddmm_args(b=torch.randn(5, 6)), ValueError, ["b must have the batch size of a"]),
    (ops.csr_sddmm, sddmm_args(a=torch.randn(4, 4)), ValueError, ["a must have n_rows = 3"]),
    (ops.csr_sddmm, sddmm_args(b=torch.randn(4, 6, dtype=torch.float64)), TypeError, ["b", "dtype of a"]),
    (ops.csr_sddmm, sddmm_args(b=torch.randn(4, 5)), ValueError, ["col_idx", "[0, n_cols = 5)"]),
    (ops.csr_sddmm, sddmm_args(a=torch.randn(3)), ValueError, ["a must be 2-D"]),
    (ops.csr_linear_backward, backward_args(grad=torch.randn(4, 4)), ValueError,
     ["grad must have out_features = 3 columns"]),
    (ops.csr_linear_backward, backward_args(x=torch.randn(4, 5)), ValueError, ["x must have in_features = 6"]),
    (ops.csr_linear_backward, backward_args(x=torch.randn(3, 6)), ValueError, ["x must have the batch size of grad"]),
    (ops.csr_linear_backward, backward_args(x=torch.randn(4, 6).double()), TypeError, ["x", "dtype of grad"]),
    (ops.csr_linear_backward, backward_args(values=torch.randn(5).double()), TypeError, ["values", "dtype of grad"]),
    (ops.csr_linear_backward, backward_args(values=torch.randn(4)), ValueError, ["values", "one entry per nonzero"]),
    (ops.csr_linear_backward, backward_args(grad=torch.randn(3)), ValueError, ["grad must be 2-D"]),
    (ops.csr_linear_backward, backward_args(row_idx=i32(0, 2, 2, 2)), ValueError,
     ["row_idx and perm must have one entry per nonzero"]),
    (ops.csr_linear_backward, backward_args(perm=torch.arange(5)), TypeError, ["perm", "int32"]),
    (ops.csr_linear_backward, backward_args(col_ptr=i32(1, 1, 2, 3, 4, 4, 5)), ValueError, ["col_ptr", "start at 0"]),
    (ops.csr_linear_backward, backward_args(row_ptr=i32(0, 3, 2, 5)), ValueError, ["row_ptr", "non-decreasing"]),
    (ops.csr_transpose, transpose_args(n_cols=-1), ValueError, ["n_cols"]),
    (ops.csr_transpose, transpose_args(n_cols=5), ValueError, ["col_idx", "[0, n_cols = 5)"]),
]
for _row_ptr, _col_idx, _exc, _words in BAD_STRUCTURES:
    BAD_CALLS.append((ops.csr_spmm, spmm_args(row_ptr=_row_ptr, col_idx=_col_idx), _exc, _words))
    BAD_CALLS.append((ops.csr_sddmm, sddmm_args(row_ptr=_row_ptr, col_idx=_col_idx), _exc, _words))
    BAD_CALLS.append((ops.csr_transpose, transpose_args(row_ptr=_row_ptr, col_idx=_col_idx), _exc, _words))


@pytest.mark.parametrize("op,args,exc,words", BAD_CALLS, ids=lambda x: getattr(x, "__name__", None))
def test_bad_input_raises_naming_the_argument(op, args, exc, words):
    with pytest.raises(exc) as info:
        op(**args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_csr_linear_rejects_a_transpose_of_another_shape():
    row_ptr, col_idx, col_ptr, row_idx, perm = linear_structure()
    x, values = torch.randn(4, 9), torch.randn(9)
    with pytest.raises(ValueError, match="col_ptr must have in_features \\+ 1"):
        ops.csr_linear(x, values, None, row_ptr, col_idx, col_ptr[:-1], row_idx, perm)
    with pytest.raises(ValueError, match="row_idx and perm must have one entry per nonzero"):
        ops.csr_linear(x, values, None, row_ptr, col_idx, col_ptr, row_idx[:-1], perm)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["row_ptr", "values", "bias", "value_perm"])
def test_csr_spmm_cpu_cuda_mismatch_is_rejected(name):
    args = spmm_args(value_perm=i32(0, 1, 2, 3, 4))
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != name else v) for k, v in args.items()}
    if name == "row_ptr":
        args["col_idx"] = args["col_idx"].cpu()
    with pytest.raises(ValueError, match=f"{name} must be on the device of"):
        ops.csr_spmm(**args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_csr_sddmm_cpu_cuda_mismatch_is_rejected():
    args = sddmm_args()
    with pytest.raises(ValueError, match="b must be on the device of a"):
        ops.csr_sddmm(args["a"].cuda(), args["b"], args["row_ptr"].cuda(), args["col_idx"].cuda())
    with pytest.raises(ValueError, match="row_ptr must be on the device of a"):
        ops.csr_sddmm(args["a"].cuda(), args["b"].cuda(), args["row_ptr"], args["col_idx"])


# --------------------------------------------------------------------------- ISA bit-identity
ISAS = ["default", "avx2", "avx512"]

# float32 csr_spmm (batch 300: two full tiles and a tail; value_perm and bias; batch 5: a
# tail only) and csr_sddmm on fixed inputs, split over 2 threads; saved for comparison.
_ISA_SCRIPT = r"""
import sys, torch, sparsemom_ext as sm
from sparsemom_ext import ops
torch.set_num_threads(2)
g = torch.Generator().manual_seed(7)
mask = torch.rand(96, 200, generator=g) < 0.3
mask[5] = True
mask[[0, 7, 95]] = False
row_ptr, col_idx = ops.csr_from_mask(mask)
col_ptr, row_idx, perm = ops.csr_transpose(row_ptr, col_idx, 200)
values = torch.randn(col_idx.numel(), generator=g)
x, dy = torch.randn(300, 200, generator=g), torch.randn(300, 96, generator=g)
bias, bias_t = torch.randn(96, generator=g), torch.randn(200, generator=g)
inputs = dict(x=x, dy=dy, values=values, bias=bias, bias_t=bias_t, row_ptr=row_ptr, col_idx=col_idx,
              col_ptr=col_ptr, row_idx=row_idx, perm=perm)
results = dict(
    spmm=ops.csr_spmm(x, row_ptr, col_idx, values, None, bias),
    spmm_t=ops.csr_spmm(dy, col_ptr, row_idx, values, perm, bias_t),
    spmm_small=ops.csr_spmm(x[:5], row_ptr, col_idx, values, None, bias),
    sddmm=ops.csr_sddmm(dy, x, row_ptr, col_idx),
    sddmm_small=ops.csr_sddmm(dy[:21], x[:21], row_ptr, col_idx),
)
# A wide, dense-enough matrix: the kernels take its columns in chunks (see csr_cpu.cpp).
wide = torch.rand(40, 4096, generator=g) < 0.15
wide_ptr, wide_idx = ops.csr_from_mask(wide)
wide_values = torch.randn(wide_idx.numel(), generator=g)
wx, wdy = torch.randn(130, 4096, generator=g), torch.randn(130, 40, generator=g)
inputs.update(wide_ptr=wide_ptr, wide_idx=wide_idx, wide_values=wide_values, wx=wx, wdy=wdy)
results.update(spmm_chunked=ops.csr_spmm(wx, wide_ptr, wide_idx, wide_values, None, None),
               sddmm_chunked=ops.csr_sddmm(wdy, wx, wide_ptr, wide_idx))
# The fused backward: its walk over the transposed structure is chunked for W = wide.T.
tall_ptr, tall_idx = ops.csr_from_mask(wide.T.contiguous())
tall_t = ops.csr_transpose(tall_ptr, tall_idx, 40)
inputs.update(tall_ptr=tall_ptr, tall_idx=tall_idx, tall_t=tall_t)
results.update(
    backward=ops.csr_linear_backward(dy, x, values, row_ptr, col_idx, col_ptr, row_idx, perm),
    backward_chunked=ops.csr_linear_backward(wx, wdy, wide_values, tall_ptr, tall_idx, *tall_t),
)
# The conv kernels: batch 130 (a full tile and a tail), 3x3 stride 2 padding 1, 40 input
# channels over 12 x 12 (the forward's channel chunks, the weight gradient's bands), a 5x5
# on few pixels at batch 5, a dense enough layer that the forward packs its windows, and a
# wide image whose input gradient runs as a forward convolution.
conv_layers = dict(conv=(130, 40, 12, (12, 12), 3, 2, 1, 0.3), conv_small=(5, 30, 7, (6, 6), 5, 1, 2, 0.3),
                   conv_packed=(19, 24, 16, (9, 9), 3, 1, 1, 0.9), conv_wide=(32, 4, 64, (3, 180), 3, 1, 1, 0.3))
for name, (n, c, o, (h, w), k, s, p, d) in conv_layers.items():
    cmask = torch.rand(o, c * k * k, generator=g) < d
    c_ptr, c_idx = ops.csr_from_mask(cmask)
    c_t = ops.csr_transpose(c_ptr, c_idx, c * k * k)
    c_values, cx = torch.randn(c_idx.numel(), generator=g), torch.randn(n, c, h, w, generator=g)
    cdy = torch.randn(n, o, ops.conv_output_size(h, k, s, p), ops.conv_output_size(w, k, s, p), generator=g)
    geometry = ((k, k), (s, s), (p, p))
    inputs[name] = dict(values=c_values, x=cx, dy=cdy, row_ptr=c_ptr, col_idx=c_idx, t=c_t, geometry=geometry)
    results[name] = (ops.csr_conv2d(cx, c_values, None, c_ptr, c_idx, *c_t, *geometry).contiguous(),
                     torch.ops.sparsemom.csr_conv2d_input_grad(cdy, c_values, *c_t, [h, w], *geometry).contiguous(),
                     ops.csr_conv2d_weight_grad(cdy, cx, c_ptr, c_idx, *geometry))
torch.save(dict(isa=sm.build_info()["cpu_isa"], inputs=inputs, results=results), sys.argv[1])
"""


def test_csr_isa_variants_are_bitwise_identical(tmp_path):
    detected = sm.build_info()["cpu_isa_detected"]
    runnable = ISAS[: ISAS.index(detected) + 1]
    if len(runnable) == 1:
        pytest.skip(f"this CPU supports only {detected}: nothing to compare against")
    procs = {}
    for isa in runnable:  # concurrently: each is mostly the import of torch
        env = dict(os.environ, SPARSEMOM_CPU_ISA=isa)
        procs[isa] = subprocess.Popen([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / f"{isa}.pt")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saved = {}
    for isa, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        saved[isa] = torch.load(tmp_path / f"{isa}.pt")
        assert saved[isa]["isa"] == isa  # the cap took effect
    baseline = saved["default"]["results"]
    for isa in runnable[1:]:
        for name, value in saved[isa]["results"].items():
            for part, base in zip(value, baseline[name]) if isinstance(value, tuple) else [(value, baseline[name])]:
                assert torch.equal(part, base), f"{name}: {isa} differs from the portable build"
    # And what they agree on is right.
    i = saved["default"]["inputs"]
    check = {
        "spmm": reference.csr_spmm(i["x"], i["row_ptr"], i["col_idx"], i["values"], None, i["bias"]),
        "spmm_t": reference.csr_spmm(i["dy"], i["col_ptr"], i["row_idx"], i["values"], i["perm"], i["bias_t"]),
        "sddmm": reference.csr_sddmm(i["dy"], i["x"], i["row_ptr"], i["col_idx"]),
        "spmm_chunked": reference.csr_spmm(i["wx"], i["wide_ptr"], i["wide_idx"], i["wide_values"], None, None),
        "sddmm_chunked": reference.csr_sddmm(i["wdy"], i["wx"], i["wide_ptr"], i["wide_idx"]),
    }
    check["backward"] = reference.csr_linear_backward(i["dy"], i["x"], i["values"], i["row_ptr"], i["col_idx"],
                                                      i["col_ptr"], i["row_idx"], i["perm"])
    check["backward_chunked"] = reference.csr_linear_backward(i["wx"], i["wdy"], i["wide_values"], i["tall_ptr"],
                                                               i["tall_idx"], *i["tall_t"])
    for name in ("conv", "conv_small", "conv_packed", "conv_wide"):
        c = i[name]
        x = c["x"].double().requires_grad_()
        y = reference.csr_conv2d(x, c["values"].double(), None, c["row_ptr"], c["col_idx"], *c["t"], *c["geometry"])
        y.backward(c["dy"].double())
        check[name] = (y.float(), x.grad.float(),
                       reference.csr_conv2d_weight_grad(c["dy"], c["x"], c["row_ptr"], c["col_idx"], *c["geometry"]))
    for name, expected in check.items():  # absolute error relative to the scale: long sums round on their partial sums
        for got, want in zip(*((baseline[name], expected) if isinstance(expected, tuple) else ((baseline[name],), (expected,)))):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()), msg=name)
