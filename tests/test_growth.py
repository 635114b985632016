"""Growth methods: GSE's candidates and their sampling distribution (chi-square), GraBo factors,
seeded candidate draws, csr momentum's candidate windows, and the memory of a wide csr
layer's training and update steps (nothing of size in x out)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import ProfilerActivity, profile

import sparsemom_ext as sm
from sparsemom_ext import SparseMomentum
from sparsemom_ext.sparsity.sampling import grabo_factors, sample_inactive

from conftest import mlp, seeded, train_steps


@pytest.mark.parametrize("connectivity", ["reference", "floor"])
def test_gse_grows_no_more_than_its_candidates(connectivity):
    model = mlp("csr", density=0.3)
    opt = sm.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = SparseMomentum(model, opt, prune_rate=1.0, decay="constant", update_every=1, growth="gse",
                            candidates=0.25, redistribution="none", connectivity=connectivity)
    counts = [w.count() for w in engine.weights]
    train_steps(model, opt, engine, steps=1)
    for record, count in zip(engine.history, counts):
        assert record.pruned == record.grown
        if connectivity == "reference":
            assert record.grown == math.ceil(0.25 * count)
        else:  # an emptied row without a candidate keeps its largest weight: one pruned less
            assert record.grown <= math.ceil(0.25 * count) and record.units_without_input == 0


# ---------------------------------------------------------------- sampling
def chi_square_check(counts, expected):
    """Pearson's statistic against the 99.9% quantile (Wilson-Hilferty) of chi-square(df)."""
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a position of probability 0 was drawn"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.09  # 99.9%
    bound = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < bound, (stat, bound)
    return stat


@pytest.mark.parametrize("sampling", ["uniform", "grabo"])
def test_sampling_distribution_matches_its_definition(sampling):
    rows, cols, draws = 5, 7, 12_000
    active = torch.tensor([0, 3, 8, 16, 22, 34])
    row_w = torch.tensor([1.0, 0.0, 2.0, 3.0, 0.5]) if sampling == "grabo" else None
    col_w = torch.tensor([0.2, 1.0, 0.0, 4.0, 1.0, 2.0, 0.7]) if sampling == "grabo" else None
    counts = torch.zeros(rows * cols)
    generator = seeded(7)
    for _ in range(draws):  # one candidate per call: each call is one draw of the distribution
        counts[sample_inactive(rows, cols, active, 1, generator, row_w, col_w)] += 1
    probability = torch.ones(rows, cols) if row_w is None else row_w[:, None] * col_w[None, :]
    probability = probability.reshape(-1).clone()
    probability[active] = 0
    expected = draws * probability / probability.sum()
    chi_square_check(counts, expected)
    # The same test rejects a wrong distribution (the check can fail).
    wrong = torch.ones(rows * cols)
    wrong[active] = 0
    if sampling == "grabo":
        with pytest.raises(AssertionError):
            chi_square_check(counts, draws * wrong / wrong.sum())


def test_a_skewed_distribution_keeps_the_law_of_sampling_without_replacement(monkeypatch):
    # One position holds most of the mass: rejection rounds keep redrawing it, so the
    # sampler finishes by enumeration with what it has chosen excluded. The inclusion
    # probability of each position in a 2-candidate set drawn sequentially without
    # replacement is p_i + sum_j p_j p_i / (1 - p_j).
    from sparsemom_ext.sparsity import sampling
    finished_by_enumeration = []
    enumerate_rest = sampling._sample_by_enumeration

    def counted(n_rows, n_cols, taken, count, *rest):
        finished_by_enumeration.append(taken.numel() > 1)  # one position is active
        return enumerate_rest(n_rows, n_cols, taken, count, *rest)

    monkeypatch.setattr(sampling, "_sample_by_enumeration", counted)
    rows = cols = 10
    active = torch.tensor([5])
    row_w = torch.ones(rows)
    row_w[0] = 1000.0
    col_w = torch.ones(cols)
    col_w[0] = 1000.0
    trials = 4000
    counts = torch.zeros(rows * cols)
    generator = seeded(3)
    for _ in range(trials):
        counts[sample_inactive(rows, cols, active, 2, generator, row_w, col_w)] += 1
    p = (row_w[:, None] * col_w[None, :]).reshape(-1).double()
    p[active] = 0
    p /= p.sum()
    inclusion = p + p * ((p / (1 - p)).sum() - p / (1 - p))
    expected = trials * inclusion
    big = expected >= 20
    assert counts.sum() == 2 * trials
    assert bool(((counts.double() - expected).abs()[big] < 5 * expected[big].sqrt()).all())
    assert any(finished_by_enumeration), "the enumeration that finishes a skewed draw was not reached"


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), density=st.floats(0.0, 1.0),
       count=st.integers(0, 200), grabo=st.booleans(), seed=st.integers(0, 1000))
def test_property_samples_are_distinct_inactive_and_sorted(rows, cols, density, count, grabo, seed):
    g = seeded(seed)
    mask = torch.rand(rows * cols, generator=g) < density
    active = mask.nonzero().reshape(-1)
    row_w = (torch.rand(rows, generator=g) * (torch.rand(rows, generator=g) < 0.8)) if grabo else None
    col_w = (torch.rand(cols, generator=g) * (torch.rand(cols, generator=g) < 0.8)) if grabo else None
    out = sample_inactive(rows, cols, active, count, seeded(seed), row_w, col_w)
    eligible = ~mask
    if grabo:
        eligible &= ((row_w[:, None] > 0) & (col_w[None, :] > 0)).reshape(-1)
    assert out.numel() == min(count, int(eligible.sum()))
    assert bool((out.diff() > 0).all()) and bool(eligible[out].all())
    assert torch.equal(out, sample_inactive(rows, cols, active, count, seeded(seed), row_w, col_w))


def test_grabo_factors_of_linear_and_conv():
    x, dy = torch.randn(4, 3), torch.randn(4, 2)
    rows, cols = grabo_factors(nn.Linear(3, 2), x, dy)
    torch.testing.assert_close(rows, dy.abs().sum(0))
    torch.testing.assert_close(cols, x.abs().sum(0))
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x, dy = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5)
    rows, cols = grabo_factors(conv, x, dy)
    patches = torch.nn.functional.unfold(x, 3, padding=1)  # (batch, c*k*k, positions)
    torch.testing.assert_close(cols, patches.abs().sum((0, 2)))
    torch.testing.assert_close(rows, dy.abs().sum((0, 2, 3)))


def test_same_seed_same_candidates_and_topology():
    structures = []
    for _ in range(2):
        model = mlp("csr", seed=2)
        opt = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = SparseMomentum(model, opt, update_every=3, total_steps=20, growth="gse", sampling="grabo", seed=11)
        train_steps(model, opt, engine, steps=10)
        structures.append([w.module.col_idx.clone() for w in engine.weights])
    for a, b in zip(*structures):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- memory
def peak_allocation(fn):
    """(peak bytes allocated above the start, largest single allocation) of ``fn()`` on CPU,
    from the profiler's allocation events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    running = peak = largest = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
        largest = max(largest, e.self_cpu_memory_usage)
    return peak, largest


def step_and_update_memory(n, density, growth, batch=64):
    """Peak and largest allocation of a training step and of an update step of one csr layer."""
    layer = sm.CsrLinear(n, n, density=density, generator=seeded())
    model = nn.Sequential(layer)
    opt = sm.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = SparseMomentum(model, opt, update_every=3, total_steps=100, growth=growth, window=2,
                            sampling="grabo")
    x = torch.randn(batch, n, generator=seeded(1))

    def training_step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        engine.step()

    training_step()                                 # step 1: the optimizer state exists
    step = peak_allocation(training_step)           # step 2 (the momentum window is open)
    update = peak_allocation(training_step)         # step 3: the update
    assert engine.updates == 1
    return step, update, layer


@pytest.mark.parametrize("growth", ["gse", "momentum"])
def test_wide_layer_training_and_update_steps_allocate_nothing_of_in_x_out(growth):
    n = 4096
    (step_peak, step_largest), (update_peak, update_largest), layer = step_and_update_memory(n, 0.05, growth)
    # A quarter of the nonzeros (and candidates) in the same 4096 x 4096 layer.
    (small_step_peak, _), (small_update_peak, small_largest), _ = step_and_update_memory(n, 0.0125, growth)
    print(f"\n{growth}, 4096x4096 at density 0.05: training step peak {step_peak / 2**20:.1f} MiB, update "
          f"step peak {update_peak / 2**20:.1f} MiB (at 0.0125: {small_step_peak / 2**20:.1f} / "
          f"{small_update_peak / 2**20:.1f} MiB), largest single allocation "
          f"{max(step_largest, update_largest) / 2**20:.1f} MiB; a dense float weight is {4 * n * n / 2**20:.0f} MiB")
    # No allocation of in x out elements, not even a bool mask (1 byte each).
    assert max(step_largest, update_largest, small_largest) < n * n
    # The update's peak scales with the nonzeros: a quarter of them, well under half the
    # memory (an in x out term would not shrink). A training step holds a few batch x
    # width activations and at most a couple of nnz-sized tensors (candidate gradients).
    assert small_update_peak < 0.4 * update_peak
    if growth == "momentum":
        assert step_peak < 8 * 64 * n * 4 + 2 * 8 * layer.nnz
    else:  # csr gse draws its candidates after the step before the update: that step scales with them
        assert small_step_peak < 0.4 * step_peak and step_peak < 4 * n * n
    assert update_peak < 4 * n * n  # less than one dense float32 weight at 95% sparsity
    # The measurement sees a dense allocation when there is one (the check can fail).
    _, largest = peak_allocation(lambda: layer.mask)
    assert largest >= n * n


def test_csr_momentum_learns_the_epoch_length_and_updates_at_epoch_ends():
    model = mlp("csr")
    opt = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = SparseMomentum(model, opt, total_steps=3 * 7, window=4)  # growth="momentum", epoch-end updates
    for epoch in range(3):
        train_steps(model, opt, engine, steps=7, seed=epoch)
        if epoch == 1:
            assert engine.growth_method.windows, "the second epoch's window opened before its end"
        engine.end_of_epoch()
    assert engine.schedule.steps_per_epoch == 7
    assert engine.updates == 2  # not after the last epoch
