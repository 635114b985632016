"""The learning-rate ramp after each topology update (``lr_ramp_steps``), as users train with it.

The lr a step really used is read off a dense parameter the user's loss drives (a bias, plain
SGD without momentum or weight decay: ``delta = -lr * grad``), not off the engine.
"""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn import functional as F

import sparsemom_ext as sm


def model_and_data(layout, seed=0):
    torch.manual_seed(seed)
    model = sm.sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)), density=0.4, layout=layout)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(24)]
    return model, batches


def bias_of(model):
    return model[2].bias


def used_lrs(model, batches, engine_args, scheduler_of, optimizer_cls=torch.optim.SGD):
    """Trains as a user does, returns per step (the lr the step used, the group's lr after the step,
    the scheduler's lr) and the engine."""
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    scheduler = scheduler_of(optimizer)
    engine = sm.SparseMomentum(model, optimizer, **engine_args)
    rows = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        bias = bias_of(model)
        before, grad = bias.detach().clone(), bias.grad.detach().clone()
        scheduled = scheduler.get_last_lr()[0]
        optimizer.step()
        engine.step()
        after = optimizer.param_groups[0]["lr"]
        scheduler.step()
        big = grad.abs().argmax()
        rows.append((float((before - bias.detach())[big] / grad[big]), after, scheduled))
    print(loss.item())  # the user's loss outlives the step
    return rows, engine


def expected_factor(k, steps, start):
    return 1.0 if k is None or k >= steps else start + (1.0 - start) * k / steps


@pytest.mark.parametrize("layout", ["mask", "csr"])
@pytest.mark.parametrize("scheduler_of", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=24),
], ids=["step", "cosine"])
def test_each_step_after_an_update_uses_the_ramped_lr_and_the_scheduler_never_sees_it(layout, scheduler_of):
    steps, start, every = 4, 0.1, 6
    model, batches = model_and_data(layout)
    args = dict(update_every=every, total_steps=100, growth="random", redistribution="magnitude",
                lr_ramp_steps=steps, lr_ramp_start=start)
    rows, engine = used_lrs(model, batches, args, scheduler_of)
    # A twin scheduler on an optimizer no engine touches: the lr the user's schedule gives.
    twin = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    twin_scheduler = scheduler_of(twin)
    assert engine.updates == 4  # after steps 6, 12, 18, 24
    for step, (used, after, scheduled) in enumerate(rows):
        assert scheduled == pytest.approx(twin_scheduler.get_last_lr()[0], rel=1e-12)
        last_update = (step // every) * every if step >= every else None
        k = None if last_update is None else step - last_update
        assert used == pytest.approx(scheduled * expected_factor(k, steps, start), rel=1e-4), (step, k)
        assert after == pytest.approx(scheduled, rel=1e-12), "param_groups must hold the schedule's lr"
        twin.step()
        twin_scheduler.step()


def test_no_ramp_by_default_and_none_before_the_first_update():
    model, batches = model_and_data("mask")
    rows, _ = used_lrs(model, batches, dict(update_every=6, total_steps=100, growth="random", redistribution="magnitude"),
                       lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100))
    assert [used for used, _, _ in rows] == pytest.approx([0.05] * len(rows), rel=1e-4)
    model, batches = model_and_data("mask")
    rows, _ = used_lrs(model, batches[:6], dict(update_every=6, total_steps=100, growth="random", redistribution="magnitude", lr_ramp_steps=50),
                       lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100))
    assert [used for used, _, _ in rows] == pytest.approx([0.05] * 6, rel=1e-4)


@pytest.mark.parametrize("layout", ["mask", "csr"])
def test_the_fused_optimizers_ramp_too(layout):
    model, batches = model_and_data(layout)
    rows, _ = used_lrs(model, batches[:9], dict(update_every=6, total_steps=100, growth="random", redistribution="magnitude", lr_ramp_steps=4, lr_ramp_start=0.25),
                       lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100),
                       optimizer_cls=lambda params, lr: sm.optim.SGD(params, lr=lr))
    assert [used for used, _, _ in rows[6:9]] == pytest.approx([0.05 * 0.25, 0.05 * 0.4375, 0.05 * 0.625], rel=1e-4)


def _train(model, optimizer, engine, batches):
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        engine.step()
    return loss


@settings(max_examples=12, deadline=None)
@given(stop=st.integers(1, 23), layout=st.sampled_from(["mask", "csr"]))
def test_property_a_run_resumed_anywhere_in_a_ramp_equals_the_run_not_stopped(stop, layout):
    args = dict(update_every=5, growth="random", redistribution="magnitude", lr_ramp_steps=4, lr_ramp_start=0.05, total_steps=24)
    model, batches = model_and_data(layout)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(model, optimizer, **args)
    _train(model, optimizer, engine, batches)

    optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(twin, optimizer, **args)
    _train(twin, optimizer, engine, batches[:stop])
    saved = copy.deepcopy((twin.state_dict(), optimizer.state_dict(), engine.state_dict()))
    resumed = copy.deepcopy(twin)
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(resumed, optimizer, **args)
    resumed.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    engine.load_state_dict(saved[2])
    _train(resumed, optimizer, engine, batches[stop:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arg,value,message", [
    ("lr_ramp_steps", -1, "lr_ramp_steps must be a non-negative int"),
    ("lr_ramp_steps", 2.5, "lr_ramp_steps must be a non-negative int"),
    ("lr_ramp_steps", True, "lr_ramp_steps must be a non-negative int"),
    ("lr_ramp_start", 0.0, "lr_ramp_start must be a number in (0, 1]"),
    ("lr_ramp_start", 1.5, "lr_ramp_start must be a number in (0, 1]"),
    ("lr_ramp_start", float("nan"), "lr_ramp_start must be a number in (0, 1]"),
    ("lr_ramp_start", "0.1", "lr_ramp_start must be a number in (0, 1]"),
])
def test_bad_ramp_arguments_are_refused_by_name_and_add_no_hook(arg, value, message):
    model, _ = model_and_data("mask")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        sm.SparseMomentum(model, optimizer, update_every=5, total_steps=100, **{arg: value})
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_a_step_that_raises_leaves_the_next_step_with_the_right_lr():
    model, batches = model_and_data("mask")
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05)
    engine = sm.SparseMomentum(model, optimizer, update_every=2, total_steps=100, growth="random", redistribution="magnitude", lr_ramp_steps=10)
    _train(model, optimizer, engine, batches[:2])
    assert engine.last_update == 2
    optimizer.param_groups[0]["weight_decay"] = float("nan")
    with pytest.raises(ValueError, match="weight_decay"):
        optimizer.step()
    optimizer.param_groups[0]["weight_decay"] = 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.02)  # the hook's value, until the next step
    rows, _ = [], None
    x, y = batches[2]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bias = bias_of(model)
    before, grad = bias.detach().clone(), bias.grad.detach().clone()
    optimizer.step()
    big = grad.abs().argmax()
    assert float((before - bias.detach())[big] / grad[big]) == pytest.approx(0.05 * 0.02, rel=1e-4)
    assert optimizer.param_groups[0]["lr"] == 0.05


def test_remove_hooks_ends_the_ramp():
    model, batches = model_and_data("mask")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = sm.SparseMomentum(model, optimizer, update_every=2, total_steps=100, growth="random", redistribution="magnitude", lr_ramp_steps=10)
    _train(model, optimizer, engine, batches[:2])
    engine.remove_hooks()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
