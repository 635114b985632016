"""Bad input gets an error naming the argument, and nothing is modified."""

import re

import pytest
import torch

import sparsemom_ext as sm

from conftest import DEVICES


def sgd_args(**override):
    g = torch.Generator().manual_seed(0)
    args = dict(
        param=torch.randn(4, 5, generator=g),
        grad=torch.randn(4, 5, generator=g),
        momentum_buffer=torch.randn(4, 5, generator=g),
        mask=torch.rand(4, 5, generator=g) < 0.5,
        lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
    )
    args.update(override)
    return args


def adam_args(**override):
    g = torch.Generator().manual_seed(0)
    args = dict(
        param=torch.randn(4, 5, generator=g),
        grad=torch.randn(4, 5, generator=g),
        exp_avg=torch.randn(4, 5, generator=g),
        exp_avg_sq=torch.rand(4, 5, generator=g),
        max_exp_avg_sq=None,
        mask=torch.rand(4, 5, generator=g) < 0.5,
        step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
    )
    args.update(override)
    return args


def mask_args(**override):
    args = dict(weight=torch.randn(4, 5), mask=torch.ones(4, 5, dtype=torch.bool))
    args.update(override)
    return args


BAD_CALLS = [
    # (op, args, exception, words the message must contain)
    (sm.mask_apply_, mask_args(mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, ["mask", "shape"]),
    (sm.mask_apply_, mask_args(mask=torch.ones(4, 5)), TypeError, ["mask", "bool"]),
    (sm.mask_apply_, mask_args(mask=torch.ones(4, 5, dtype=torch.uint8)), TypeError, ["mask", "bool"]),
    (sm.mask_apply_, mask_args(weight=torch.ones(4, 5, dtype=torch.int32)), TypeError, ["weight", "float"]),
    (sm.mask_apply_, mask_args(weight=torch.ones(4, 5, dtype=torch.complex64)), TypeError, ["weight", "float"]),
    (sm.mask_apply_, mask_args(weight=torch.ones(1, 5).expand(4, 5)), ValueError, ["weight", "overlapping"]),
    (sm.fused_sgd_step_, sgd_args(mask=torch.ones(20, dtype=torch.bool)), ValueError, ["mask", "shape"]),
    (sm.fused_sgd_step_, sgd_args(mask=torch.ones(4, 5)), TypeError, ["mask", "bool"]),
    (sm.fused_sgd_step_, sgd_args(grad=torch.randn(5, 4)), ValueError, ["grad", "shape"]),
    (sm.fused_sgd_step_, sgd_args(grad=torch.randn(4, 5, dtype=torch.float64)), TypeError, ["grad", "dtype"]),
    (sm.fused_sgd_step_, sgd_args(param=torch.ones(4, 5, dtype=torch.int64)), TypeError, ["param", "float"]),
    (sm.fused_sgd_step_, sgd_args(momentum_buffer=torch.randn(3, 5)), ValueError, ["momentum_buffer", "shape"]),
    (sm.fused_sgd_step_, sgd_args(momentum_buffer=torch.randn(4, 5).half()), TypeError, ["momentum_buffer", "dtype"]),
    (sm.fused_sgd_step_, sgd_args(momentum_buffer=None), ValueError, ["momentum_buffer", "momentum"]),
    (sm.fused_sgd_step_, sgd_args(lr=-0.1), ValueError, ["lr", ">= 0"]),
    (sm.fused_sgd_step_, sgd_args(lr=float("nan")), ValueError, ["lr", "finite"]),
    (sm.fused_sgd_step_, sgd_args(momentum=-0.5), ValueError, ["momentum", ">= 0"]),
    (sm.fused_sgd_step_, sgd_args(weight_decay=-1.0), ValueError, ["weight_decay"]),
    (sm.fused_sgd_step_, sgd_args(nesterov=True, dampening=0.1), ValueError, ["nesterov", "dampening"]),
    (sm.fused_adam_step_, adam_args(beta1=1.0), ValueError, ["beta1", "[0, 1)"]),
    (sm.fused_adam_step_, adam_args(beta1=-0.1), ValueError, ["beta1", "[0, 1)"]),
    (sm.fused_adam_step_, adam_args(beta2=1.5), ValueError, ["beta2", "[0, 1)"]),
    (sm.fused_adam_step_, adam_args(lr=-1e-3), ValueError, ["lr", ">= 0"]),
    (sm.fused_adam_step_, adam_args(eps=-1e-8), ValueError, ["eps", ">= 0"]),
    (sm.fused_adam_step_, adam_args(step=0), ValueError, ["step", ">= 1"]),
    (sm.fused_adam_step_, adam_args(exp_avg=torch.randn(4, 4)), ValueError, ["exp_avg", "shape"]),
    (sm.fused_adam_step_, adam_args(exp_avg_sq=torch.rand(4, 5, dtype=torch.float64)), TypeError, ["exp_avg_sq", "dtype"]),
    (sm.fused_adam_step_, adam_args(max_exp_avg_sq=torch.rand(2, 5)), ValueError, ["max_exp_avg_sq", "shape"]),
    (sm.fused_adam_step_, adam_args(mask=torch.ones(4, 5, dtype=torch.int8)), TypeError, ["mask", "bool"]),
    (sm.fused_adam_step_, adam_args(param=torch.ones(1, 5).expand(4, 5).float()), ValueError, ["param", "overlapping"]),
    (sm.fused_adam_step_, adam_args(exp_avg=torch.zeros(1, 5).expand(4, 5)), ValueError, ["exp_avg", "overlapping"]),
]


def _snapshot(args):
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("op,args,exc,words", BAD_CALLS, ids=lambda x: getattr(x, "__name__", None))
def test_bad_input_raises_naming_the_argument_and_modifies_nothing(op, args, exc, words):
    before = _snapshot(args)
    with pytest.raises(exc) as info:
        op(**args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} was modified by a failed call"


@pytest.mark.parametrize(
    "op,args,name",
    [
        (sm.mask_apply_, mask_args(mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), "mask"),
        (sm.fused_sgd_step_, sgd_args(grad=torch.randn(4, 5, device="meta")), "grad"),
    ],
)
def test_device_mismatch_is_rejected(op, args, name):
    # On a CPU-only machine the second device is "meta"; with a GPU the CUDA test
    # below checks a real CPU/CUDA mismatch.
    with pytest.raises((ValueError, RuntimeError), match=f"{name} must be on the device of"):
        op(**args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_cpu_cuda_mismatch_is_rejected():
    args = sgd_args(mask=torch.ones(4, 5, dtype=torch.bool, device="cuda"))
    before = _snapshot(args)
    with pytest.raises(ValueError, match="mask must be on the device of param"):
        sm.fused_sgd_step_(**args)
    for name, value in before.items():
        assert torch.equal(args[name].cpu(), value.cpu())


def test_attach_mask_rejects_bad_masks():
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        sm.attach_mask(p, torch.ones(3, 4))
    with pytest.raises(ValueError, match="shape of param"):
        sm.attach_mask(p, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="param must be a tensor"):
        sm.attach_mask("weight", torch.ones(3, 4, dtype=torch.bool))
    assert sm.mask_of(p) is None



SHARED_MEMORY_CALLS = [
    (sm.fused_sgd_step_, "param", "grad"),
    (sm.fused_sgd_step_, "param", "momentum_buffer"),
    (sm.fused_adam_step_, "exp_avg", "exp_avg_sq"),
    (sm.fused_adam_step_, "grad", "exp_avg"),
]


@pytest.mark.parametrize("op,first,second", SHARED_MEMORY_CALLS)
def test_arguments_sharing_memory_are_rejected(op, first, second):
    args = sgd_args() if op is sm.fused_sgd_step_ else adam_args()
    storage = torch.rand(40)
    args[first] = storage[:20].view(4, 5)
    args[second] = storage[10:30].view(4, 5)  # partial overlap
    before = storage.clone()
    with pytest.raises(ValueError, match=f"{first} and {second} must not share memory"):
        op(**args)
    assert torch.equal(storage, before)


def test_mask_bytes_other_than_one_count_as_active():
    weight = torch.arange(1.0, 6.0)
    mask = torch.tensor([0, 1, 2, 255, 0], dtype=torch.uint8).view(torch.bool)
    sm.mask_apply_(weight, mask)
    assert weight.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


def test_momentum_buffer_is_ignored_without_momentum():
    args = sgd_args(momentum=0.0)
    buf_before = args["momentum_buffer"].clone()
    expected = args["param"] - 0.1 * args["grad"]
    expected[~args["mask"]] = 0
    sm.fused_sgd_step_(**args)
    assert torch.equal(args["momentum_buffer"], buf_before)
    torch.testing.assert_close(args["param"], expected)


# ---------------------------------------------------------------- optimizers: every group before any step
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsemom_ext.csr_structure import flat_indices, structure_from_flat  # noqa: E402

from conftest import mlp, seeded, train_steps  # noqa: E402

NON_FINITE = [float("nan"), float("inf"), float("-inf")]
# (optimizer, hyperparameter, bad values besides NaN/inf): the parent torch.optim step
# would take these for the unmasked parameters (biases) and the groups before the bad one.
BAD_HYPERPARAMETERS = [
    ("SGD", "lr", [-0.1]), ("SGD", "momentum", [-0.5]), ("SGD", "weight_decay", [-1e-4]), ("SGD", "dampening", []),
    ("Adam", "lr", [-1e-3]), ("Adam", "eps", [-1e-8]), ("Adam", "weight_decay", [-1e-2]),
    ("AdamW", "lr", [-1e-3]), ("AdamW", "weight_decay", [-1.0]),
]


def _grouped_optimizer(name, layout="mask"):
    """A sparse MLP whose layers are three param groups (masked weights and dense biases in
    each), after two steps (optimizer state exists), with fresh gradients."""
    model = mlp(layout, sizes=(6, 8, 8, 3))
    linear = [m for m in model if not isinstance(m, torch.nn.ReLU)]
    groups = [{"params": list(m.parameters())} for m in linear]
    cls = getattr(sm.optim, name)
    optimizer = cls(groups, lr=0.05, momentum=0.9) if name == "SGD" else cls(groups, lr=1e-2)
    train_steps(model, optimizer, None, steps=2)
    model(torch.randn(4, 6, generator=seeded(5), dtype=torch.float64)).square().mean().backward()
    return model, optimizer


def _optimizer_snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return params, state


def _assert_unchanged(model, optimizer, snapshot):
    params, state = snapshot
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before), "a parameter moved in a refused step"
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        for key, value in s.items():
            before = state[id(p)][key]
            assert torch.equal(value, before) if isinstance(value, torch.Tensor) else value == before, key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(BAD_HYPERPARAMETERS), group=st.integers(0, 2), non_finite=st.sampled_from(NON_FINITE),
       use_finite=st.booleans(), layout=st.sampled_from(["mask", "csr"]))
def test_property_a_bad_hyperparameter_in_any_group_is_refused_before_any_parameter_moves(
        case, group, non_finite, use_finite, layout):
    name, key, finite_bad = case
    bad = finite_bad[0] if use_finite and finite_bad else non_finite
    model, optimizer = _grouped_optimizer(name, layout)
    optimizer.param_groups[group][key] = bad
    before = _optimizer_snapshot(model, optimizer)
    with pytest.raises(ValueError, match=re.escape(f"param_groups[{group}]['{key}'] must be a finite number")):
        optimizer.step()
    _assert_unchanged(model, optimizer, before)


@pytest.mark.parametrize("name,key,bad,words", [
    ("Adam", "betas", (0.9, 1.0), "param_groups[1]['betas'][1] must be a finite number >= 0 and < 1"),
    ("Adam", "betas", (float("nan"), 0.999), "param_groups[1]['betas'][0]"),
    ("AdamW", "betas", (0.9,), "param_groups[1]['betas'] must be a pair"),
    ("SGD", "nesterov", True, "param_groups[1]: nesterov=True requires momentum > 0 and dampening == 0"),
])
def test_bad_betas_and_nesterov_are_refused_before_any_parameter_moves(name, key, bad, words):
    model, optimizer = _grouped_optimizer(name)
    optimizer.param_groups[1][key] = bad
    if key == "nesterov":
        optimizer.param_groups[1]["dampening"] = 0.5
    before = _optimizer_snapshot(model, optimizer)
    with pytest.raises(ValueError, match=re.escape(words)):
        optimizer.step()
    _assert_unchanged(model, optimizer, before)


def test_a_nan_lr_loaded_from_a_state_dict_is_refused_at_the_step():
    model, optimizer = _grouped_optimizer("SGD")
    saved = optimizer.state_dict()
    saved["param_groups"][2]["lr"] = float("nan")  # torch.optim's load_state_dict takes it
    optimizer.load_state_dict(saved)
    before = _optimizer_snapshot(model, optimizer)
    with pytest.raises(ValueError, match=re.escape("param_groups[2]['lr'] must be a finite number >= 0, got nan")):
        optimizer.step()
    _assert_unchanged(model, optimizer, before)


# ---------------------------------------------------------------- engine state: checked whole, applied whole
def _engine(layout="mask", growth="random", seed=0, momentum=0.9, **kwargs):
    model = mlp(layout, sizes=(6, 8, 8, 3), seed=seed)
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    engine = sm.SparseMomentum(model, optimizer, update_every=2, total_steps=20, growth=growth,
                               redistribution="magnitude", seed=seed, **kwargs)
    return model, optimizer, engine


def _saved_engine_state(**kwargs):
    """The state of an engine that trained 5 steps (two updates): other masks, counters and generator."""
    model, optimizer, engine = _engine(seed=7, **kwargs)
    train_steps(model, optimizer, engine, steps=5)
    return engine.state_dict()


def _engine_snapshot(model, engine):
    return ([t.clone() for t in model.state_dict().values()], engine.state_dict(),
            (engine.steps, engine.updates, engine.schedule, engine.generator.get_state()))


def _assert_engine_unchanged(model, engine, snapshot):
    tensors, state, scalars = snapshot
    for t, before in zip(model.state_dict().values(), tensors):
        assert torch.equal(t, before), "the model changed in a refused load"
    now = engine.state_dict()
    for name, entry in now["layers"].items():
        for key, value in entry.items():  # a mask (mask layout) or an nnz (csr layout)
            before = state["layers"][name][key]
            assert torch.equal(value, before) if isinstance(value, torch.Tensor) else value == before
    assert (engine.steps, engine.updates, engine.schedule) == scalars[:3]
    assert engine.last_update == state["last_update"]
    assert torch.equal(engine.generator.get_state(), scalars[3])


def _corrupt(state, how):
    first = sorted(state["layers"])[0]
    mask = state["layers"][first]["mask"]
    if how.startswith("missing "):
        del state[how[len("missing "):]]
    elif how == "generator too short":
        state["generator"] = state["generator"][:-8]
    elif how == "generator a list":
        state["generator"] = state["generator"].tolist()
    elif how == "float mask":
        state["layers"][first]["mask"] = torch.tensor([0.0, 0.5, 1.0]).repeat(mask.numel())[:mask.numel()].view(
            mask.shape)
    elif how == "mask of another shape":
        state["layers"][first]["mask"] = mask.t().clone()
    elif how == "unknown layer":
        state["layers"]["nope.weight"] = state["layers"].pop(first)
    elif how == "negative steps":
        state["steps"] = -1
    elif how == "last update after steps":
        state["last_update"] = state["steps"] + 1
    elif how == "other options":
        state["options"]["prune"] = "set"
    elif how == "unknown option":
        state["options"]["colour"] = "blue"
    elif how == "bad schedule":
        state["schedule"]["prune_rate"] = 1.5
    elif how == "window of a dense-gradient layer":
        state["windows"] = {first: {"flat": torch.tensor([0]), "state": {}}}
    elif how == "not a dict":
        return [state]
    return state


CORRUPTIONS = {
    **{f"missing {key}": [key] for key in ("steps", "updates", "last_update", "layers", "windows", "generator",
                                            "schedule", "options")},
    "last update after steps": ["last_update", "int in [0, steps"],
    "generator too short": ["generator", "CPU torch.Generator state"],
    "generator a list": ["generator", "CPU torch.Generator state"],
    "float mask": ["mask", "bool tensor"],
    "mask of another shape": ["mask", "shape"],
    "unknown layer": ["layers", "nope.weight"],
    "negative steps": ["steps", "non-negative int"],
    "other options": ["options", "same arguments"],
    "unknown option": ["options", "colour"],
    "bad schedule": ["schedule", "prune_rate"],
    "window of a dense-gradient layer": ["windows"],
    "not a dict": ["state_dict must be a dict"],
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=st.sampled_from(sorted(CORRUPTIONS)), steps=st.integers(0, 4))
def test_property_a_bad_engine_state_is_refused_and_nothing_changes(how, steps):
    model, optimizer, engine = _engine()
    train_steps(model, optimizer, engine, steps=steps)
    state = _corrupt(_saved_engine_state(), how)
    before = _engine_snapshot(model, engine)
    with pytest.raises(ValueError) as info:
        engine.load_state_dict(state)
    for word in CORRUPTIONS[how]:
        assert word in str(info.value), (word, str(info.value))
    _assert_engine_unchanged(model, engine, before)


def test_engine_state_loads_whole_when_it_is_good():
    model, optimizer, engine = _engine()
    saved = _saved_engine_state()
    engine.load_state_dict(saved)
    assert engine.state_dict()["steps"] == 5 and engine.updates == 2
    for w in engine.weights:
        assert torch.equal(w.mask, saved["layers"][w.name]["mask"])
        assert not w.param[~w.mask].any()


def test_engine_state_refused_when_the_optimizer_no_longer_has_the_momentum_its_growth_reads():
    # Built over SGD with momentum, then the optimizer's state_dict of a run without momentum
    # is loaded (torch.optim takes its hyperparameters): growth by momentum has nothing to read.
    model, optimizer, engine = _engine(growth="momentum")
    train_steps(model, optimizer, engine, steps=1)
    saved = engine.state_dict()
    plain = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
    optimizer.load_state_dict(plain.state_dict())
    before = _engine_snapshot(model, engine)
    with pytest.raises(ValueError, match="momentum=0"):
        engine.load_state_dict(saved)
    _assert_engine_unchanged(model, engine, before)


@pytest.mark.parametrize("how,words", [
    ("flat out of range", "['flat'] must be sorted, distinct flat indices in [0, 48)"),
    ("flat unsorted", "['flat'] must be sorted, distinct"),
    ("state missing", "['state'] must hold ['momentum_buffer']"),
    ("state of another length", "one entry per candidate"),
])
def test_bad_candidate_windows_are_refused_and_nothing_changes(how, words):
    model, optimizer, engine = _engine("csr", growth="momentum", window=2)
    train_steps(model, optimizer, engine, steps=1)  # the window of the update at step 2 is open
    saved = engine.state_dict()
    name = sorted(saved["windows"])[0]
    window = saved["windows"][name]
    if how == "flat out of range":
        window["flat"][-1] = 48
    elif how == "flat unsorted":
        window["flat"] = window["flat"].flip(0)
    elif how == "state missing":
        window["state"] = {}
    else:
        window["state"]["momentum_buffer"] = window["state"]["momentum_buffer"][:-1]
    before = _engine_snapshot(model, engine)
    windows_before = {k: w.flat.clone() for k, w in engine.growth_method.windows.items()}
    with pytest.raises(ValueError, match=re.escape(words)):
        engine.load_state_dict(saved)
    _assert_engine_unchanged(model, engine, before)
    assert {k: w.flat for k, w in engine.growth_method.windows.items()}.keys() == windows_before.keys()
    for k, w in engine.growth_method.windows.items():
        assert torch.equal(w.flat, windows_before[k])


# ---------------------------------------------------------------- CSR structures handed to the conversions
@st.composite
def malformed_structures(draw):
    """(row_ptr, col_idx, n_cols, words): a structure of a random mask with one rule broken."""
    n_rows, n_cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bits = draw(st.lists(st.booleans(), min_size=n_rows * n_cols, max_size=n_rows * n_cols))
    mask = torch.tensor(bits).view(n_rows, n_cols)
    mask[0, 0] = True  # at least one nonzero to break
    row_ptr, col_idx = sm.ops.csr_from_mask(mask)
    nnz = col_idx.numel()
    how = draw(st.sampled_from(["col below 0", "col past n_cols", "row_ptr decreasing", "row_ptr end",
                                "row_ptr start"]))
    k = draw(st.integers(0, nnz - 1))
    if how == "col below 0":
        col_idx[k] = draw(st.sampled_from([-1, -n_cols, -2**31]))
        words = f"col_idx must be in [0, n_cols = {n_cols})"
    elif how == "col past n_cols":
        col_idx[k] = draw(st.sampled_from([n_cols, n_cols + 7, 2**31 - 1]))
        words = f"col_idx must be in [0, n_cols = {n_cols})"
    elif how == "row_ptr decreasing":
        # One interior entry above the end: the structure still starts at 0 and ends at nnz.
        row_ptr = torch.cat([row_ptr[:1], torch.tensor([nnz + 1], dtype=torch.int32), row_ptr[1:]])
        words = "row_ptr must be non-decreasing"
    elif how == "row_ptr end":
        row_ptr[-1] = nnz + draw(st.sampled_from([-1, 1, 2**20]))
        words = f"row_ptr must end at nnz = col_idx.numel() = {nnz}"
    else:
        row_ptr[0] = draw(st.sampled_from([-1, 1]))
        words = "row_ptr must start at 0"
    return row_ptr, col_idx, n_cols, words


@settings(max_examples=60, deadline=None)
@given(case=malformed_structures(),
       op=st.sampled_from(["csr_to_mask", "csr_to_dense", "csr_values_from_dense", "flat_indices"]))
def test_property_structure_conversions_refuse_malformed_structures_naming_the_argument(case, op):
    row_ptr, col_idx, n_cols, words = case
    values = torch.randn(col_idx.numel(), generator=seeded(1))
    weight = torch.randn(row_ptr.numel() - 1, n_cols, generator=seeded(2))
    before = [t.clone() for t in (row_ptr, col_idx, values, weight)]
    call = {
        "csr_to_mask": lambda: sm.ops.csr_to_mask(row_ptr, col_idx, n_cols),
        "csr_to_dense": lambda: sm.ops.csr_to_dense(values, row_ptr, col_idx, n_cols),
        "csr_values_from_dense": lambda: sm.ops.csr_values_from_dense(weight, row_ptr, col_idx),
        "flat_indices": lambda: flat_indices(row_ptr, col_idx, n_cols),
    }[op]
    with pytest.raises(ValueError, match=re.escape(words)):
        call()
    for t, b in zip((row_ptr, col_idx, values, weight), before):
        assert torch.equal(t, b)


@settings(max_examples=40, deadline=None)
@given(flat=st.lists(st.integers(-3, 40), min_size=1, max_size=12), n_rows=st.integers(1, 5),
       n_cols=st.integers(1, 8))
def test_property_structure_from_flat_takes_only_sorted_distinct_indices_in_the_matrix(flat, n_rows, n_cols):
    flat = torch.tensor(flat)
    valid = bool((flat.diff() > 0).all()) and int(flat.min()) >= 0 and int(flat.max()) < n_rows * n_cols
    if valid:
        row_ptr, col_idx = structure_from_flat(flat, n_rows, n_cols)
        assert torch.equal(flat_indices(row_ptr, col_idx, n_cols), flat)
    else:
        with pytest.raises(ValueError, match=re.escape(
                f"flat must be sorted, distinct flat indices in [0, n_rows * n_cols = {n_rows * n_cols})")):
            structure_from_flat(flat, n_rows, n_cols)
    with pytest.raises(ValueError, match="flat must be a 1-D int64 tensor, got torch.int32"):
        structure_from_flat(flat.int(), n_rows, n_cols)


@pytest.mark.parametrize("call,words", [
    (lambda: sm.ops.csr_to_mask(torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), 2),
     "row_ptr must be a 1-D int32 tensor, got torch.int64"),
    (lambda: sm.ops.csr_to_mask(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), -1),
     "n_cols must be an int in [0, 2^31], got -1"),
    (lambda: sm.ops.csr_to_dense(torch.ones(2), torch.tensor([0, 1], dtype=torch.int32),
                                 torch.tensor([0], dtype=torch.int32), 2),
     "values must be a 1-D tensor with one entry per nonzero (1)"),
    (lambda: sm.ops.csr_values_from_dense(torch.ones(3, 2), torch.tensor([0, 1], dtype=torch.int32),
                                          torch.tensor([0], dtype=torch.int32)),
     "row_ptr must have n_rows + 1 = 4 entries, got 2"),
])
def test_structure_conversions_name_bad_arguments(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def test_csr_from_mask_refuses_a_structure_past_int32_before_allocating_it():
    # 2^32 True entries (a zero-stride view: no memory): row_ptr would wrap to -2^31 and
    # col_idx would need 16 GiB. The count stops once it passes 2^31 - 1.
    mask = torch.ones(1, 1, dtype=torch.bool).expand(65536, 65536)
    with pytest.raises(ValueError, match=re.escape("at most 2^31 - 1 nonzeros (row_ptr and col_idx are int32), "
                                                   "this one would have 2147483648 or more")):
        sm.ops.csr_from_mask(mask)
    with pytest.raises(ValueError, match=re.escape("at most 2^31 columns (col_idx is int32), got n_cols = 2147483649")):
        sm.ops.csr_from_mask(torch.zeros(1, 1, dtype=torch.bool).expand(0, 2**31 + 1))
    with pytest.raises(ValueError, match=re.escape("at most 2^31 columns (col_idx is int32), got n_cols = 2147483649")):
        structure_from_flat(torch.tensor([5]), 1, 2**31 + 1)


# ---------------------------------------------------------------- perm of the layer ops: a permutation
def _layer_args(seed=0, n_out=7, n_in=9, density=0.4, batch=3):
    g = seeded(seed)
    mask = torch.rand(n_out, n_in, generator=g) < density
    mask[0, 0] = mask[1, 1] = True
    row_ptr, col_idx = sm.ops.csr_from_mask(mask)
    col_ptr, row_idx, perm = sm.ops.csr_transpose(row_ptr, col_idx, n_in)
    values = torch.randn(col_idx.numel(), generator=g)
    x, grad = torch.randn(batch, n_in, generator=g), torch.randn(batch, n_out, generator=g)
    return dict(values=values, row_ptr=row_ptr, col_idx=col_idx, col_ptr=col_ptr, row_idx=row_idx, perm=perm,
                x=x, grad=grad, mask=mask)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), pair=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
       op=st.sampled_from(["csr_linear", "csr_linear_backward", "masked_linear"]))
def test_property_a_perm_with_a_repeat_is_refused_by_the_layer_ops(seed, pair, op):
    a = _layer_args(seed)
    nnz = a["perm"].numel()
    i, j = pair[0] % nnz, pair[1] % nnz
    if i == j:
        j = (i + 1) % nnz
    a["perm"][j] = a["perm"][i]  # in range, but position perm[j] held is never read (nor written)
    values = a["values"].clone().requires_grad_()
    before = {k: v.clone() for k, v in a.items()}
    with pytest.raises(ValueError, match=re.escape(f"perm must be a permutation of [0, nnz = {nnz})")):
        if op == "csr_linear":
            sm.ops.csr_linear(a["x"], values, None, a["row_ptr"], a["col_idx"], a["col_ptr"], a["row_idx"], a["perm"])
        elif op == "csr_linear_backward":
            sm.ops.csr_linear_backward(a["grad"], a["x"], a["values"], a["row_ptr"], a["col_idx"], a["col_ptr"],
                                       a["row_idx"], a["perm"])
        else:
            weight = torch.zeros(a["mask"].shape)
            weight[a["mask"]] = a["values"]
            flat = a["mask"].reshape(-1).nonzero().reshape(-1)
            sm.ops.masked_linear(a["x"], weight, None, a["row_ptr"], a["col_idx"], a["col_ptr"], a["row_idx"],
                                 a["perm"], flat)
    assert values.grad is None
    for k, v in a.items():
        assert torch.equal(v, before[k])


def test_a_perm_written_after_a_checked_call_is_checked_again():
    # The check is remembered per perm buffer (the layers pass a fresh slice of theirs each call);
    # a write through any view of the buffer is seen.
    a = _layer_args(1)
    nnz = a["perm"].numel()
    buffer = torch.cat([a["perm"], torch.zeros(4, dtype=torch.int32)])  # a fixed capacity, as CsrLinear's
    args = lambda: (a["grad"], a["x"], a["values"], a["row_ptr"], a["col_idx"], a["col_ptr"], a["row_idx"],
                    buffer[:nnz])
    good = sm.ops.csr_linear_backward(*args())
    torch.testing.assert_close(good[1], sm.reference.csr_linear_backward(*args())[1])
    buffer[:nnz][1] = buffer[0]
    with pytest.raises(ValueError, match="perm must be a permutation"):
        sm.ops.csr_linear_backward(*args())
    buffer[1] = a["perm"][1]
    assert torch.equal(sm.ops.csr_linear_backward(*args())[1], good[1])


@pytest.mark.parametrize("op,name", [("csr_spmm", "values"), ("csr_spmm", "x"), ("csr_sddmm", "a"),
                                     ("csr_linear_backward", "values")])
def test_ops_without_a_backward_refuse_inputs_that_want_a_gradient(op, name):
    a = _layer_args(2)
    a[name if name != "a" else "grad"] = a[name if name != "a" else "grad"].clone().requires_grad_()
    calls = {
        "csr_spmm": lambda: sm.ops.csr_spmm(a["x"], a["row_ptr"], a["col_idx"], a["values"]),
        "csr_sddmm": lambda: sm.ops.csr_sddmm(a["grad"], a["x"], a["row_ptr"], a["col_idx"]),
        "csr_linear_backward": lambda: sm.ops.csr_linear_backward(a["grad"], a["x"], a["values"], a["row_ptr"],
                                                                  a["col_idx"], a["col_ptr"], a["row_idx"], a["perm"]),
    }
    with pytest.raises(ValueError, match=re.escape(f"{name} requires grad, but {op} has no backward: use csr_linear")):
        calls[op]()
    with torch.no_grad():  # no gradient wanted: the op runs
        out = calls[op]()
    assert not (out[0] if isinstance(out, tuple) else out).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_a_mask_layer_refuses_a_mask_that_is_not_bool_and_changes_nothing(dtype):
    layer = sm.SparseLinear(6, 4, density=0.5, generator=torch.Generator().manual_seed(0))
    state = layer.state_dict()
    state["mask"] = torch.full((4, 6), 0.5).to(dtype)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        layer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_attention_refuses_a_projection_mask_that_is_not_bool_and_changes_nothing():
    attention = sm.sparsify(torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2)), density=0.5)[0]
    state = attention.state_dict()
    state["in_proj_weight_mask"] = torch.full_like(state["in_proj_weight_mask"], 0.5, dtype=torch.float32)
    before = {k: v.clone() for k, v in attention.state_dict().items()}
    with pytest.raises(RuntimeError, match="in_proj_weight_mask must be a bool tensor"):
        attention.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in attention.state_dict().items())
