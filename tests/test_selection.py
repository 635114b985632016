"""Selection ops (magnitude_prune, momentum_grow, set_prune): exact equality with the
reference, the rules of docs/algorithms.md section 2 stated directly, invariants (hypothesis),
opcheck, and bad input."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemom_ext as sm
from sparsemom_ext import reference

from conftest import DEVICES, FLOAT_DTYPES, MASK_KINDS, make_mask, non_contiguous, run_opcheck

# (op, reference, which positions are candidates)
OPS = {
    "magnitude_prune": (sm.magnitude_prune, reference.magnitude_prune, "active"),
    "momentum_grow": (sm.momentum_grow, reference.momentum_grow, "inactive"),
    "set_prune": (sm.set_prune, reference.set_prune, "active"),
}

# Empty, one element, odd 1-D, 2-D, conv-like, and one large enough to be split over
# threads and to take the sampled path (>= 65536 elements).
SELECTION_SHAPES = [(0,), (1,), (101,), (33, 65), (4, 3, 3, 3), (300, 257)]

# Most values tie: magnitudes 0, 1 and 2, with -0.0 among the zeros.
TIED_VALUES = torch.tensor([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0])


def make_values(shape, dtype, device, kind, gen):
    if kind == "tied":
        idx = torch.randint(len(TIED_VALUES), shape, generator=gen)
        values = TIED_VALUES[idx]
    else:
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
    return values.to(dtype=dtype, device=device)


def available(mask, candidates):
    active = int(mask.sum())
    return active if candidates == "active" else mask.numel() - active


def k_values(avail):
    """0, 1, an odd middle value and all available, without repeats."""
    return sorted({0, min(1, avail), avail // 2 + (avail > 2), avail})


def check_against_reference(op_name, values, mask, k):
    op, ref, candidates = OPS[op_name]
    before_values, before_mask = values.clone(), mask.clone()
    result = op(values, mask, k)
    expected = ref(values.cpu(), mask.cpu(), k)
    assert result.dtype == torch.bool and result.shape == mask.shape and result.is_contiguous()
    assert result.device == mask.device
    assert torch.equal(result.cpu(), expected), f"{op_name} k={k} differs from the reference"
    # Functional: inputs untouched, the result is new memory.
    assert torch.equal(values, before_values) or torch.isnan(values).any()
    assert torch.equal(mask, before_mask)
    if result.numel():
        assert result.data_ptr() != mask.data_ptr()
    changed = int((result != mask).sum())
    assert changed == k
    if candidates == "active":
        assert not (result & ~mask).any()
    else:
        assert not (mask & ~result).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SELECTION_SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("values_kind", ["randn", "tied"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_selection_matches_reference(device, op_name, dtype, shape, mask_kind, values_kind,
                                     contiguous, gen):
    values = make_values(shape, dtype, device, values_kind, gen)
    mask = make_mask(shape, mask_kind, device, gen)
    if not contiguous:
        values, mask = non_contiguous(values), non_contiguous(mask)
    for k in k_values(available(mask, OPS[op_name][2])):
        check_against_reference(op_name, values, mask, k)


# --------------------------------------------------------------------------- the rules, stated directly
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [10, 100_000])
def test_ties_go_to_the_lower_flat_index(device, numel):
    weight = torch.ones(numel, device=device)
    mask = torch.ones(numel, dtype=torch.bool, device=device)
    mask[::3] = False
    active = torch.nonzero(mask).reshape(-1)
    k = len(active) // 2 + 1
    pruned = sm.magnitude_prune(weight, mask, k)
    assert torch.equal(torch.nonzero(mask & ~pruned).reshape(-1), active[:k])
    inactive = torch.nonzero(~mask).reshape(-1)
    grown = sm.momentum_grow(torch.full((numel,), 3.0, device=device), mask, len(inactive) // 2)
    assert torch.equal(torch.nonzero(grown & ~mask).reshape(-1), inactive[: len(inactive) // 2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_is_larger_than_inf(device, dtype):
    nan, inf = float("nan"), float("inf")
    values = torch.tensor([nan, 1.0, -inf, 0.5, -nan, inf, 2.0, -0.0], dtype=dtype, device=device)
    mask = torch.ones(8, dtype=torch.bool, device=device)
    # Prune order: -0.0 (0), 0.5, 1.0, 2.0, -inf/inf (by index), then the NaNs.
    order = [7, 3, 1, 6, 2, 5, 0, 4]
    for k in range(9):
        pruned = sm.magnitude_prune(values, mask, k)
        assert sorted(torch.nonzero(~pruned).reshape(-1).tolist()) == sorted(order[:k])
    # Grow picks the NaNs first, then the infinities; equal keys still go by index.
    grow_order = [0, 4, 2, 5, 6, 1, 3, 7]
    none = torch.zeros(8, dtype=torch.bool, device=device)
    for k in range(9):
        grown = sm.momentum_grow(values, none, k)
        assert sorted(torch.nonzero(grown).reshape(-1).tolist()) == sorted(grow_order[:k])


@pytest.mark.parametrize("device", DEVICES)
def test_grow_never_picks_an_active_position(device):
    score = torch.arange(1000, dtype=torch.float32, device=device)
    mask = torch.zeros(1000, dtype=torch.bool, device=device)
    mask[500:] = True  # the largest scores are all active
    grown = sm.momentum_grow(score, mask, 100)
    assert torch.equal(torch.nonzero(grown & ~mask).reshape(-1).cpu(), torch.arange(400, 500))
    assert torch.equal(grown[500:], mask[500:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "positive,negative,k,expected",
    [
        # (active >= 0, active < 0, k) -> (removed from >= 0, removed from < 0)
        (10, 10, 7, (4, 3)),
        (10, 10, 20, (10, 10)),
        (2, 10, 9, (2, 7)),  # the >= 0 side runs out: its remainder moves
        (10, 1, 6, (5, 1)),  # the < 0 side runs out
        (0, 5, 3, (0, 3)),
        (5, 0, 1, (1, 0)),
    ],
)
def test_set_prune_splits_k_over_the_sides(device, positive, negative, k, expected):
    g = torch.Generator().manual_seed(positive * 100 + negative)
    weight = torch.cat([torch.rand(positive, generator=g) + 0.1, -torch.rand(negative, generator=g) - 0.1])
    weight = weight[torch.randperm(len(weight), generator=g)].to(device)
    mask = torch.ones(len(weight), dtype=torch.bool, device=device)
    pruned = sm.set_prune(weight, mask, k)
    removed = mask & ~pruned
    assert (int((removed & (weight >= 0)).sum()), int((removed & (weight < 0)).sum())) == expected
    # Within each side, the removed weights are those closest to zero.
    for side in (weight >= 0, weight < 0):
        kept, gone = weight[side & pruned].abs(), weight[side & removed].abs()
        if len(kept) and len(gone):
            assert gone.max() <= kept.min()


@pytest.mark.parametrize("device", DEVICES)
def test_set_prune_counts_negative_zero_on_the_nonnegative_side(device):
    weight = torch.tensor([-0.0, -1.0, -0.5, 0.25, 3.0], device=device)
    mask = torch.ones(5, dtype=torch.bool, device=device)
    # k=2: one from the >= 0 side (-0.0, the closest to zero there), one from the < 0 side (-0.5).
    assert sm.set_prune(weight, mask, 2).tolist() == [False, True, False, True, True]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("period", [64, 1000, 4096])
def test_periodic_values_are_selected_exactly(device, period):
    # Values that repeat with the period of the CPU's sample make the sample unrepresentative:
    # the result must still be exact (the exact path takes over).
    n = 200_000
    i = torch.arange(n)
    weight = (1.0 + 100.0 * ((i % period) >= 128).double() + i.double() / n).float().to(device)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(period)) < 0.5).to(device)
    k = int(mask.sum()) // 2
    for name in OPS:
        check_against_reference(name, weight, mask, k if name != "momentum_grow" else n - int(mask.sum()) - 7)


def test_result_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(5)
    n = 600_000
    weight = torch.randn(n, generator=g)
    weight[: n // 3] = 0.5  # a block of ties across several chunks
    mask = torch.rand(n, generator=g) < 0.4
    threads = torch.get_num_threads()
    results = {}
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            results[t] = [op(weight, mask, k) for op, k in
                          ((sm.magnitude_prune, 100_000), (sm.momentum_grow, 200_001), (sm.set_prune, 99_999))]
    finally:
        torch.set_num_threads(threads)
    first = next(iter(results.values()))
    for result in results.values():
        for a, b in zip(first, result):
            assert torch.equal(a, b)
    assert torch.equal(first[0], reference.magnitude_prune(weight, mask, 100_000))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("values_kind", ["randn", "tied"])
def test_cuda_matches_cpu_on_a_large_layer(op_name, values_kind):
    g = torch.Generator().manual_seed(3)
    values = make_values((1024, 1031), torch.float32, "cpu", values_kind, g)
    mask = torch.rand(values.shape, generator=g) < 0.1
    op, _, candidates = OPS[op_name]
    k = available(mask, candidates) // 2 + 1
    assert torch.equal(op(values.cuda(), mask.cuda(), k).cpu(), op(values, mask, k))


# --------------------------------------------------------------------------- properties
NUMELS = st.one_of(st.integers(0, 3000), st.integers(65_536, 90_000))


@st.composite
def selection_cases(draw):
    numel = draw(NUMELS)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    kind = draw(st.sampled_from(["randn", "tied"]))
    values = make_values((numel,), dtype, "cpu", kind, g)
    mask = torch.rand(numel, generator=g) < draw(st.floats(0.0, 1.0))
    return values, mask, draw(st.floats(0.0, 1.0))


@settings(max_examples=100, deadline=None)
@given(case=selection_cases())
def test_prune_property(case):
    weight, mask, fraction = case
    k = math.floor(fraction * int(mask.sum()))
    pruned = sm.magnitude_prune(weight, mask, k)
    assert int(pruned.sum()) == int(mask.sum()) - k
    assert not (pruned & ~mask).any()  # a subset of the active positions
    assert torch.equal(pruned, reference.magnitude_prune(weight, mask, k))


@settings(max_examples=100, deadline=None)
@given(case=selection_cases())
def test_grow_property(case):
    score, mask, fraction = case
    k = math.floor(fraction * (mask.numel() - int(mask.sum())))
    grown = sm.momentum_grow(score, mask, k)
    assert int(grown.sum()) == int(mask.sum()) + k
    assert not (mask & ~grown).any()  # only inactive positions are added
    assert torch.equal(grown, reference.momentum_grow(score, mask, k))


@settings(max_examples=100, deadline=None)
@given(case=selection_cases())
def test_set_prune_property(case):
    weight, mask, fraction = case
    k = math.floor(fraction * int(mask.sum()))
    pruned = sm.set_prune(weight, mask, k)
    assert int(pruned.sum()) == int(mask.sum()) - k
    assert not (pruned & ~mask).any()
    positive, negative = reference.set_prune_sides(weight, mask)
    want = reference.set_prune_split(k, len(positive), len(negative))
    removed = ~pruned.reshape(-1)
    assert (int(removed[positive].sum()), int(removed[negative].sum())) == want
    assert torch.equal(pruned, reference.set_prune(weight, mask, k))


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    for dtype, shape in itertools.product([torch.float32, torch.float64], [(5, 7), (0,), (3,)]):
        values = torch.randn(shape, generator=g, dtype=dtype).to(device)
        mask = (torch.rand(shape, generator=g) < 0.5).to(device)
        active = int(mask.sum())
        yield torch.ops.sparsemom.magnitude_prune.default, (values, mask, active // 2)
        yield torch.ops.sparsemom.momentum_grow.default, (values, mask, (mask.numel() - active) // 2)
        yield torch.ops.sparsemom.set_prune.default, (values, mask, active)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    assert run_opcheck(_opcheck_samples(device)) == 18


# --------------------------------------------------------------------------- bad input
def selection_args(**override):
    g = torch.Generator().manual_seed(0)
    args = dict(values=torch.randn(4, 5, generator=g), mask=torch.rand(4, 5, generator=g) < 0.5, k=2)
    args.update(override)
    return args


def call(op_name, args):
    op = OPS[op_name][0]
    return op(args["values"], args["mask"], args["k"])


VALUES_NAME = {"magnitude_prune": "weight", "momentum_grow": "score", "set_prune": "weight"}

BAD_SELECTION_CALLS = [
    # (override, exception, words the message must contain; {values} is the argument's name)
    (dict(k=-1), ValueError, ["k", ">= 0"]),
    (dict(mask=torch.ones(4, 5)), TypeError, ["mask", "bool"]),
    (dict(mask=torch.ones(4, 5, dtype=torch.uint8)), TypeError, ["mask", "bool"]),
    (dict(mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, ["mask", "shape"]),
    (dict(mask=torch.ones(20, dtype=torch.bool)), ValueError, ["mask", "shape"]),
    (dict(values=torch.ones(4, 5, dtype=torch.int32)), TypeError, ["{values}", "float"]),
    (dict(values=torch.ones(4, 5, dtype=torch.complex64)), TypeError, ["{values}", "float"]),
]


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("override,exc,words", BAD_SELECTION_CALLS)
def test_bad_input_raises_naming_the_argument_and_modifies_nothing(op_name, override, exc, words):
    args = selection_args(**override)
    before = {name: v.clone() for name, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc) as info:
        call(op_name, args)
    for word in words:
        word = word.format(values=VALUES_NAME[op_name])
        assert word in str(info.value), f"{word!r} not in {info.value}"
    for name, value in before.items():
        assert torch.equal(args[name], value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("numel", [20, 100_000])
def test_k_above_the_available_count_is_rejected(device, op_name, numel):
    g = torch.Generator().manual_seed(numel)
    args = selection_args(values=torch.randn(numel, generator=g).to(device),
                          mask=(torch.rand(numel, generator=g) < 0.3).to(device))
    avail = available(args["mask"], OPS[op_name][2])
    before = {name: v.clone() for name, v in args.items() if isinstance(v, torch.Tensor)}
    args["k"] = avail + 1
    with pytest.raises(ValueError) as info:
        call(op_name, args)
    message = str(info.value)
    assert "k" in message and f"({avail})" in message and f"k={avail + 1}" in message, message
    assert ("inactive" if OPS[op_name][2] == "inactive" else "active positions") in message
    for name, value in before.items():
        assert torch.equal(args[name], value)
    args["k"] = avail  # the boundary itself is fine
    call(op_name, args)


@pytest.mark.parametrize("op_name", list(OPS))
def test_k_on_an_empty_tensor(op_name):
    args = selection_args(values=torch.randn(0, 3), mask=torch.zeros(0, 3, dtype=torch.bool), k=0)
    assert call(op_name, args).shape == (0, 3)
    args["k"] = 1
    with pytest.raises(ValueError, match=r"\(0\), got k=1"):
        call(op_name, args)


@pytest.mark.parametrize("op_name", list(OPS))
def test_device_mismatch_is_rejected(op_name):
    # On a CPU-only machine the second device is "meta", as in test_bad_input.py.
    args = selection_args(mask=torch.ones(4, 5, dtype=torch.bool, device="meta"))
    with pytest.raises((ValueError, RuntimeError), match=f"mask must be on the device of {VALUES_NAME[op_name]}"):
        call(op_name, args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
@pytest.mark.parametrize("op_name", list(OPS))
def test_cpu_cuda_mismatch_is_rejected(op_name):
    args = selection_args(mask=torch.ones(4, 5, dtype=torch.bool, device="cuda"))
    with pytest.raises(ValueError, match="mask must be on the device of"):
        call(op_name, args)


def test_mask_bytes_other_than_one_count_as_active():
    weight = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    mask = torch.tensor([0, 1, 2, 255, 1], dtype=torch.uint8).view(torch.bool)
    pruned = sm.magnitude_prune(weight, mask, 2)  # removes 1.0 and 2.0
    assert pruned.view(torch.uint8).tolist() == [0, 0, 1, 0, 1]  # a clean 0/1 mask
    grown = sm.momentum_grow(weight, mask, 1)
    assert grown.view(torch.uint8).tolist() == [1, 1, 1, 1, 1]
