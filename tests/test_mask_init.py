"""Initial masks: per-layer densities (uniform/er/erk), exact counts, seeded draws."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemom_ext.sparsity.init import exact_count, layer_counts, layer_densities, random_mask

from conftest import DEVICES

LENET_300_100 = [(300, 784), (100, 300), (10, 100)]
LENET_5 = [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
DISTRIBUTIONS = ["uniform", "er", "erk"]


def numel(shape):
    return math.prod(shape)


def er_raw(shape):
    return (shape[0] + shape[1]) / (shape[0] * shape[1])


def erk_raw(shape):
    return sum(shape) / numel(shape)


@pytest.mark.parametrize("layers", [LENET_300_100, LENET_5], ids=["lenet300", "lenet5"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.5, 0.9, 1.0])
def test_counts_are_exact_per_layer_and_globally(layers, distribution, density):
    densities = layer_densities(layers, density, distribution)
    counts = layer_counts(layers, density, distribution)
    total = sum(numel(s) for s in layers)
    assert sum(counts) == round(density * total)
    assert all(isinstance(c, int) for c in counts)
    for shape, d, c in zip(layers, densities, counts):
        assert 0 < d <= 1.0
        assert 0 <= c <= numel(shape)
        # Largest-remainder rounding: each count is the floor or the ceiling of its share.
        assert abs(c - d * numel(shape)) < 1.0
    assert sum(d * numel(s) for s, d in zip(layers, densities)) == pytest.approx(density * total, rel=1e-12)


def test_uniform_gives_every_layer_the_density():
    assert layer_densities(LENET_5, 0.05, "uniform") == [0.05] * 4
    assert layer_counts(LENET_300_100, 0.05) == [11760, 1500, 50]


def test_er_densities_are_proportional_to_the_formula():
    densities = layer_densities(LENET_300_100, 0.05, "er")
    ratios = [d / er_raw(s) for s, d in zip(LENET_300_100, densities)]
    assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-12)
    # The small output layer gets the highest density, the big input layer the lowest.
    assert densities[0] < 0.05 < densities[1] < densities[2] < 1.0


def test_erk_uses_the_kernel_and_equals_er_on_linear_layers():
    assert layer_densities(LENET_300_100, 0.1, "erk") == pytest.approx(layer_densities(LENET_300_100, 0.1, "er"), rel=1e-12)
    densities = layer_densities(LENET_5, 0.05, "erk")
    uncapped = [(s, d) for s, d in zip(LENET_5, densities) if d < 1.0]
    assert len(uncapped) >= 3
    ratios = [d / erk_raw(s) for s, d in uncapped]
    assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-12)
    # ER ignores the kernel for conv weights (channels only), so it differs from ERK there.
    er = layer_densities(LENET_5, 0.05, "er")
    assert er[1] / er[2] == pytest.approx(er_raw(LENET_5[1]) / er_raw(LENET_5[2]), rel=1e-12)
    assert er[1] != pytest.approx(densities[1])


def test_er_caps_a_tiny_layer_at_dense_and_keeps_the_global_density_exact():
    layers = [(1000, 1000), (2, 2), (1000, 500)]
    density = 0.1
    total = sum(numel(s) for s in layers)
    naive_scale = density * total / sum(er_raw(s) * numel(s) for s in layers)
    assert naive_scale * er_raw(layers[1]) > 1.0, "the test case must need capping"
    densities = layer_densities(layers, density, "er")
    counts = layer_counts(layers, density, "er")
    assert densities[1] == 1.0
    assert counts[1] == 4
    assert sum(counts) == round(density * total)
    # The others share what is left, still in the ER proportion.
    assert densities[0] / densities[2] == pytest.approx(er_raw(layers[0]) / er_raw(layers[2]), rel=1e-12)
    assert densities[0] * 1e6 + densities[2] * 5e5 == pytest.approx(density * total - 4, rel=1e-12)


def test_capping_cascades_until_no_layer_exceeds_one():
    # Capping the smallest layer raises the scale, which then pushes the next one over.
    layers = [(1, 1), (3, 3), (8, 8), (400, 400)]
    density = 0.5
    densities = layer_densities(layers, density, "erk")
    counts = layer_counts(layers, density, "erk")
    assert densities[:3] == [1.0, 1.0, 1.0]
    assert counts[:3] == [1, 9, 64]
    assert all(d <= 1.0 for d in densities)
    assert sum(counts) == round(density * sum(numel(s) for s in layers))


def test_density_one_is_dense_for_every_distribution():
    for distribution in DISTRIBUTIONS:
        assert layer_counts(LENET_5, 1.0, distribution) == [numel(s) for s in LENET_5]


def test_tiny_density_may_give_a_layer_zero_weights():
    counts = layer_counts([(10, 10), (10, 10)], 0.004)
    assert counts == [1, 0]  # round(0.8) == 1 globally; the tie goes to the first layer
    assert exact_count(0.001, 100) == 0


def test_layers_may_be_tensors():
    weights = [torch.empty(s) for s in LENET_300_100]
    assert layer_counts(weights, 0.05, "er") == layer_counts(LENET_300_100, 0.05, "er")


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf")])
def test_density_outside_range_is_a_value_error(density):
    with pytest.raises(ValueError, match="density"):
        layer_densities(LENET_300_100, density)
    with pytest.raises(ValueError, match="density"):
        layer_counts(LENET_300_100, density, "er")


@pytest.mark.parametrize("density", [True, "0.5", None, [0.5]])
def test_density_of_wrong_type_is_a_type_error(density):
    with pytest.raises(TypeError, match="density"):
        layer_counts(LENET_300_100, density)


def test_unknown_distribution_lists_the_valid_ones():
    with pytest.raises(ValueError, match="distribution") as info:
        layer_counts(LENET_300_100, 0.1, "erdos")
    for name in DISTRIBUTIONS:
        assert repr(name) in str(info.value)


def test_er_needs_two_dimensions():
    with pytest.raises(ValueError, match="layers\\[1\\]"):
        layer_densities([(4, 4), (7,)], 0.5, "er")
    assert layer_counts([(4, 4), (7,)], 0.5) == [8, 4]  # uniform takes any shape; round(11.5) == 12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,count", [((30, 20), 0), ((30, 20), 1), ((30, 20), 123), ((6, 3, 5, 5), 200),
                                          ((30, 20), 600), ((0, 4), 0)])
def test_random_mask_has_exactly_count_active(device, shape, count):
    mask = random_mask(shape, count, torch.Generator().manual_seed(0), device=device)
    assert mask.dtype == torch.bool
    assert mask.shape == torch.Size(shape)
    assert mask.device.type == device
    assert int(mask.sum()) == count


@pytest.mark.parametrize("device", DEVICES)
def test_random_mask_same_seed_same_mask_on_every_device(device):
    a = random_mask((40, 50), 300, torch.Generator().manual_seed(7))
    b = random_mask((40, 50), 300, torch.Generator().manual_seed(7), device=device)
    c = random_mask((40, 50), 300, torch.Generator().manual_seed(8))
    assert torch.equal(a, b.cpu())
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = random_mask((40, 50), 300)
    torch.manual_seed(3)
    assert torch.equal(d, random_mask((40, 50), 300))


def test_random_mask_positions_are_spread_uniformly():
    g = torch.Generator().manual_seed(0)
    hits = sum(random_mask((10, 10), 10, g).float() for _ in range(2000))
    # Each position is active with probability 0.1: expected 200 hits, sd about 13.4.
    assert hits.min() > 140 and hits.max() < 260


def test_random_mask_draws_nothing_when_no_choice_is_left():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert random_mask((5, 5), 25, g).all()
    assert not random_mask((5, 5), 0, g).any()
    assert torch.equal(g.get_state(), state)


def test_random_mask_bad_input():
    with pytest.raises(ValueError, match="count"):
        random_mask((3, 3), 10)
    with pytest.raises(ValueError, match="count"):
        random_mask((3, 3), -1)
    with pytest.raises(TypeError, match="count"):
        random_mask((3, 3), 2.0)
    with pytest.raises(TypeError, match="generator"):
        random_mask((3, 3), 2, generator=0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            random_mask((3, 3), 2, generator=torch.Generator(device="cuda"))


shape_2d = st.tuples(st.integers(1, 400), st.integers(1, 400))
shape_4d = st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(1, 7), st.integers(1, 7))


@settings(max_examples=300, deadline=None)
@given(layers=st.lists(st.one_of(shape_2d, shape_4d), min_size=1, max_size=8),
       density=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False),
       distribution=st.sampled_from(DISTRIBUTIONS))
def test_property_count_sum_is_exact(layers, density, distribution):
    densities = layer_densities(layers, density, distribution)
    counts = layer_counts(layers, density, distribution)
    numels = [numel(s) for s in layers]
    assert sum(counts) == round(density * sum(numels))
    for d, c, n in zip(densities, counts, numels):
        assert 0.0 <= d <= 1.0  # 0.0 only when a subnormal density underflows
        assert 0 <= c <= n
        assert abs(c - d * n) < 1.0 + 1e-9
        if d == 1.0:
            assert c == n
