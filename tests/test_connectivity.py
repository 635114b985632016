"""The connectivity rule (docs/algorithms.md, section 5): under ``connectivity="floor"`` no
output unit of a sparse layer is left without an input, by ``sparsify`` or by any update;
``"reference"`` is the reference code's behaviour. The issue's small network, the parts
(floor_counts, connect_rows, best_per_row, the growths' row picks) against their definitions,
and the errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext import SparseMomentum
from sparsemom_ext.sparsity.connectivity import best_per_row, connect_rows, floor_counts
from sparsemom_ext.sparsity.growth import CandidatePool, DenseScorePool, RandomPool
from sparsemom_ext.sparsity.init import layer_counts, random_mask

from conftest import mlp, rows_without_input, seeded, train_steps

ISSUE_SIZES = (64, 3, 2, 1, 10)


def issue_network(connectivity, layout="mask", seed=0):
    """Linear 64-3-2-1-10 at density 0.1: 21 weights for 16 output units."""
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out in zip(ISSUE_SIZES[:-1], ISSUE_SIZES[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return sm.sparsify(nn.Sequential(*layers[:-1]), density=0.1, layout=layout, generator=seeded(seed),
                       connectivity=connectivity)


def sparse_layers(model):
    return [m for m in model if isinstance(m, (sm.SparseLinear, sm.CsrLinear))]


def train_and_update(model, engine, opt, updates, seed=0):
    """``updates`` rounds of three steps on a 10-class problem, each followed by an update;
    returns each layer's (nnz, rows without input) after every update."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 64, generator=g), torch.randint(10, (64,), generator=g)
    after = []
    for _ in range(updates):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            engine.step()
        engine.update()
        after.append([(layer.nnz, rows_without_input(layer.mask)) for layer in sparse_layers(model)])
    return after


def test_the_issues_network_disconnects_at_the_reference_and_not_with_the_rule():
    reference = issue_network("reference")
    # The reference draw gives Linear(2, 1) no weight at all.
    assert [layer.nnz for layer in sparse_layers(reference)] == [19, 1, 0, 1]
    opt = sm.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    engine = SparseMomentum(reference, opt, total_steps=100, connectivity="reference")
    assert train_and_update(reference, engine, opt, updates=1)[0][1] == (0, 2)  # Linear(3, 2) emptied
    assert [r.units_without_input for r in engine.history] == [0, 2, 1, 0]  # the history says so

    for layout in ("mask", "csr"):
        model = issue_network("floor", layout)
        layers = sparse_layers(model)
        assert sum(layer.nnz for layer in layers) == round(0.1 * (192 + 6 + 2 + 10))  # the budget is exact
        assert all(rows_without_input(layer.mask) == 0 and layer.nnz >= layer.out_features for layer in layers)
        opt = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = SparseMomentum(model, opt, total_steps=100)  # the rule is the default
        for counts in train_and_update(model, engine, opt, updates=5):
            assert sum(nnz for nnz, _ in counts) == 21
            for (nnz, empty), layer in zip(counts, layers):
                assert empty == 0 and nnz >= layer.out_features, (layout, counts)


def row_signal(layer, growth, opt):
    """What mask-layout growth ranks a layer's positions by: its momentum or its gradient."""
    weight = layer.weight
    return (opt.state[weight]["momentum_buffer"] if growth == "momentum" else weight.grad).detach().clone()


@pytest.mark.parametrize("scope,growth", [(scope, growth) for scope in ("layer", "global")
                                           for growth in ("momentum", "gradient", "gse", "random")
                                           if (scope, growth) != ("global", "random")])  # random has no scores
def test_rate_one_regrows_each_emptied_unit_from_its_own_row_in_both_layouts(scope, growth):
    """Prune rate 1 empties every row: each regrows one weight of its own row, the budget stays exact."""
    for layout in ("mask", "csr"):
        model = issue_network("floor", layout, seed=1)
        layers = sparse_layers(model)
        opt = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = SparseMomentum(model, opt, prune_rate=1.0, decay="constant", growth=growth, scope=scope)
        train_steps(model, opt, engine, steps=2)
        before = [(layer.mask.clone(), layer.dense_weight().detach().clone()) for layer in layers]
        signals = ([row_signal(layer, growth, opt) for layer in layers]
                   if layout == "mask" and growth in ("momentum", "gradient") else None)
        engine.update()
        assert sum(layer.nnz for layer in layers) == 21, layout
        for i, (layer, (mask, weight)) in enumerate(zip(layers, before)):
            new, value = layer.mask, layer.dense_weight().detach()
            assert rows_without_input(new) == 0 and layer.nnz >= layer.out_features, (layout, growth, i)
            if signals is not None:  # the row's largest |signal| is back (a pruned weight regrown keeps its value)
                best = signals[i].abs().argmax(dim=1)
                assert bool(new[torch.arange(new.shape[0]), best].all()), (layout, growth, i)
            else:  # a new weight (grown at zero), or, where the row had no candidate, its largest weight kept
                for r in range(new.shape[0]):
                    fresh = new[r] & ~mask[r]
                    largest = int(torch.where(mask[r], weight[r].abs(), -1.0).argmax())
                    assert bool(fresh.any()) or (new[r, largest] and value[r, largest] == weight[r, largest]), \
                        (layout, growth, i, r)
                    assert not value[r][fresh].any()


def test_the_growths_row_picks_take_each_rows_best_or_say_they_have_none():
    rows = torch.tensor([0, 2])
    score = torch.tensor([[0.1, -0.7, 0.7], [9.0, 9.0, 9.0], [0.0, 0.0, 0.2]])
    positions, state, missing = DenseScorePool(score).row_picks(rows, 3, seeded())
    assert positions.tolist() == [1, 8] and state is None and missing.numel() == 0  # ties: the first
    pool = CandidatePool(torch.tensor([2, 4, 6, 7]), torch.tensor([0.5, 3.0, -0.5, 0.5]),
                         {"momentum_buffer": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    positions, state, missing = pool.row_picks(torch.tensor([0, 2, 3]), 3, seeded())
    assert positions.tolist() == [2, 6] and state["momentum_buffer"].tolist() == [1.0, 3.0]
    assert missing.tolist() == [3]  # no candidate in row 3
    taken = torch.tensor([2, 6])  # the picks are no longer offered
    assert pool.select(taken, 2)[0].tolist() == [4, 7]
    assert pool.scored(taken)[0].tolist() == [4, 7]
    positions, _, missing = RandomPool(4, 5, seeded()).row_picks(torch.tensor([1, 3]), 5, seeded(7))
    assert torch.div(positions, 5, rounding_mode="floor").tolist() == [1, 3] and missing.numel() == 0
    assert positions.remainder(5).tolist() == torch.randint(5, (2,), generator=seeded(7)).tolist()


def test_the_rule_changes_nothing_when_no_unit_would_lose_its_inputs():
    """At a low prune rate no row empties: both options make the same update."""
    results = []
    for connectivity in ("reference", "floor"):
        model = mlp("mask", density=0.5, seed=2)
        opt = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = SparseMomentum(model, opt, prune_rate=0.05, decay="constant", update_every=3, seed=4,
                                connectivity=connectivity)
        train_steps(model, opt, engine, steps=9)
        assert engine.updates == 3
        results.append([w.mask.clone() for w in engine.weights])
        # the precondition: the reference update emptied no row here
        assert all(rows_without_input(m) == 0 for m in results[-1])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_sparsify_reference_draws_todays_masks_and_floor_keeps_them_when_connected():
    """connectivity='reference' is layer_counts + random_mask in named_modules() order; 'floor'
    returns the same masks when they already give every unit an input."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    counts = layer_counts([(20, 30), (10, 20)], 0.4)
    g = seeded(3)
    expected = [random_mask((20, 30), counts[0], g), random_mask((10, 20), counts[1], g)]
    assert all(rows_without_input(m) == 0 for m in expected)
    for connectivity in ("reference", "floor"):
        model = sm.sparsify(nn.Sequential(*[m for m in dense]), 0.4, generator=seeded(3), connectivity=connectivity)
        assert all(torch.equal(layer.mask, m) for layer, m in zip(sparse_layers(model), expected))


def test_sparsify_floor_moves_surplus_into_empty_units_and_keeps_the_weights_of_the_dense_layer():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 8), nn.ReLU(), nn.Conv2d(8, 6, 1))
    reference = sm.sparsify(nn.Sequential(*[m for m in dense]), 0.04, generator=seeded(0), connectivity="reference")
    assert sum(rows_without_input(m) for m in (reference[0].mask, reference[2].mask, reference[4].mask)) > 0
    model = sm.sparsify(nn.Sequential(*[m for m in dense]), 0.04, generator=seeded(0))
    for layer, ref, original in zip((model[0], model[2], model[4]), (reference[0], reference[2], reference[4]),
                                    (dense[0], dense[2], dense[4])):
        assert rows_without_input(layer.mask) == 0
        assert layer.nnz >= layer.weight.shape[0]
        # the weights are the dense layer's at the active positions, zero elsewhere
        assert torch.equal(layer.weight.detach(), original.weight.detach().masked_fill(~layer.mask, 0))
    total = sum(m.weight.numel() for m in (dense[0], dense[2], dense[4]))
    assert sum(m.nnz for m in (model[0], model[2], model[4])) == round(0.04 * total)


def test_sparsify_refuses_a_density_below_one_weight_per_unit():
    model = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))  # 40 weights, 21 output units
    with pytest.raises(ValueError, match=r"connectivity='floor'.*21 output units.*2 weights.*'reference'"):
        sm.sparsify(model, 0.05, generator=seeded())
    with pytest.raises(ValueError, match="connectivity must be one of 'floor', 'reference'"):
        sm.sparsify(model, 0.5, connectivity="none")
    sm.sparsify(model, 0.05, generator=seeded(), connectivity="reference")  # allowed, units may be cut


def test_engine_refuses_masks_with_units_without_inputs():
    layer = sm.SparseLinear(10, 6, density=1.0)
    with torch.no_grad():
        layer.mask[2] = False
        layer.mask[4] = False
    model = nn.Sequential(layer)
    opt = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"'0.weight' has 2 of its 6 output units without an input \(rows 2, 4\)"):
        SparseMomentum(model, opt, total_steps=10)
    with pytest.raises(ValueError, match="connectivity must be one of"):
        SparseMomentum(model, opt, total_steps=10, connectivity="off")
    engine = SparseMomentum(model, opt, total_steps=10, connectivity="reference")
    assert engine.options.connectivity == "reference"


def test_engine_checks_the_rule_again_at_each_update_and_changes_nothing():
    model = issue_network("floor")
    opt = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = SparseMomentum(model, opt, total_steps=100)
    train_steps(model, opt, engine, steps=2)
    layer = sparse_layers(model)[1]
    with torch.no_grad():  # a user edits a mask behind the engine's back
        layer.mask[0] = False
    masks = [m.mask.clone() for m in sparse_layers(model)]
    with pytest.raises(ValueError, match="'2.weight' has 1 of its 2 output units without an input"):
        engine.update()
    assert all(torch.equal(m.mask, old) for m, old in zip(sparse_layers(model), masks))
    assert engine.updates == 0


# ---------------------------------------------------------------- the parts
@settings(max_examples=200, deadline=None)
@given(counts_floors=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), min_size=1, max_size=6))
def test_property_floor_counts_is_exact_and_meets_every_floor(counts_floors):
    counts = [c for c, _ in counts_floors]
    floors = [f for _, f in counts_floors]
    names = [f"l{i}" for i in range(len(counts))]
    if sum(counts) < sum(floors):
        with pytest.raises(ValueError, match="raise the density"):
            floor_counts(counts, floors, names)
        return
    result = floor_counts(counts, floors, names)
    assert sum(result) == sum(counts)
    assert all(r >= f for r, f in zip(result, floors))
    # a layer at or below its floor ends at it; one above it only gives
    assert all(r == f if c <= f else f <= r <= c for r, c, f in zip(result, counts, floors))


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), extra=st.integers(0, 40), seed=st.integers(0, 100))
def test_property_connect_rows_fills_every_row_and_keeps_the_count(rows, cols, extra, seed):
    count = min(rows * cols, rows + extra)
    mask = random_mask((rows, cols), count, seeded(seed))
    connected = connect_rows(mask, seeded(seed))
    assert int(connected.sum()) == count
    assert rows_without_input(connected) == 0
    if rows_without_input(mask) == 0:
        assert connected is mask
    else:  # only empty rows gained; rows that had several positions gave
        gained = (connected & ~mask).reshape(rows, -1)
        lost = (mask & ~connected).reshape(rows, -1)
        had = mask.sum(1)
        assert bool((had[gained.any(1)] == 0).all())
        assert bool((had[lost.any(1)] >= 2).all())


def test_best_per_row_is_each_rows_largest_magnitude_ties_to_the_first():
    # entries of rows 0, 0, 2, 3, 3: row 0 ties at 0.5 (the first), row 1 has none
    rows_of = torch.tensor([0, 0, 2, 3, 3])
    score = torch.tensor([0.5, -0.5, 0.1, -2.0, 1.0])
    assert best_per_row(rows_of, score, torch.tensor([0, 1, 3])).tolist() == [0, 3]
    assert best_per_row(rows_of, score, torch.tensor([1])).numel() == 0


@pytest.mark.parametrize("layout", ["mask", "csr"])
@pytest.mark.parametrize("what,growth,bad", [("momentum", "momentum", math.nan), ("momentum", "momentum", math.inf),
                                             ("weights", "random", math.inf),
                                             ("gradient growth scores", "gradient", -math.inf)])
def test_non_finite_signals_name_the_layer_and_change_nothing(layout, what, growth, bad):
    model = issue_network("floor", layout, seed=3)
    opt = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    redistribution = "momentum" if growth == "momentum" else "magnitude"
    engine = SparseMomentum(model, opt, total_steps=100, growth=growth, redistribution=redistribution)
    train_steps(model, opt, engine, steps=2)
    layer = sparse_layers(model)[2]  # Linear(2, 1), named '4.weight' (or '4.values')
    param = layer.weight if layout == "mask" else layer.values
    with torch.no_grad():
        if what == "momentum":
            opt.state[param]["momentum_buffer"].view(-1)[0] = bad
        elif what == "weights":
            param.view(-1)[int(layer.mask.reshape(-1).nonzero()[0]) if layout == "mask" else 0] = bad
        elif layout == "mask":
            param.grad.view(-1)[0] = bad
        else:  # csr: RigL's gradient is the one the layer's tap delivered on the last step
            engine._tapped[engine.weights[2].name]["dense"].view(-1)[0] = bad
    masks = [m.mask.clone() for m in sparse_layers(model)]
    values = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    with pytest.raises(sm.NonFiniteSignalError, match=rf"at step 2 found \d NaN or infinite {what} in "
                                                      r"'4.(weight|values)'; nothing was changed"):
        engine.update()
    assert engine.updates == 0 and engine.history == []
    assert all(torch.equal(m.mask, old) for m, old in zip(sparse_layers(model), masks))
    for p, old_value, old_state in zip(model.parameters(), values, state):
        torch.testing.assert_close(p.detach(), old_value, rtol=0, atol=0, equal_nan=True)
        for key, tensor in old_state.items():
            torch.testing.assert_close(opt.state[p][key], tensor, rtol=0, atol=0, equal_nan=True)
