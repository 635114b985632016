"""The elementwise ops (mask_apply_, fused_sgd_step_, fused_adam_step_) against their pure-PyTorch
references, over devices x dtypes x shapes x masks, and opcheck."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemom_ext as sm
from sparsemom_ext import reference

from conftest import DEVICES, FLOAT_DTYPES, MASK_KINDS, SHAPES, make_mask, non_contiguous, tolerances, run_opcheck


def randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def maybe_non_contiguous(t, contiguous):
    return t if contiguous else non_contiguous(t)


# --------------------------------------------------------------------------- mask_apply_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_mask_apply_matches_reference(device, dtype, shape, mask_kind, contiguous, gen):
    weight = maybe_non_contiguous(randn(shape, dtype, device, gen), contiguous)
    mask = maybe_non_contiguous(make_mask(shape, mask_kind, device, gen), contiguous)
    expected = weight.clone()
    reference.mask_apply_(expected, mask)
    sm.mask_apply_(weight, mask)
    # Selection only, no arithmetic: bit-exact.
    assert torch.equal(weight, expected)
    assert not weight[~mask].any()


def test_mask_apply_zeros_nan_and_inf_at_inactive_positions():
    weight = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 2.0])
    mask = torch.tensor([False, False, False, False, True])
    sm.mask_apply_(weight, mask)
    assert weight.tolist() == [0.0, 0.0, 0.0, 0.0, 2.0]
    assert not torch.signbit(weight[:4]).any()  # +0, as masked_fill gives


@settings(max_examples=200, deadline=None)
@given(
    numel=st.integers(0, 5000),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_apply_property_keeps_exactly_the_active_values(numel, density, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(numel, generator=g)
    mask = torch.rand(numel, generator=g) < density
    before = weight.clone()
    sm.mask_apply_(weight, mask)
    assert torch.equal(weight[mask], before[mask])
    assert torch.count_nonzero(weight[~mask]) == 0
    sm.mask_apply_(weight, mask)  # idempotent
    assert torch.equal(weight[mask], before[mask])


# --------------------------------------------------------------------------- fused SGD
SGD_CONFIGS = [
    # momentum, dampening, weight_decay, nesterov, maximize
    (0.0, 0.0, 0.0, False, False),
    (0.0, 0.0, 5e-4, False, True),
    (0.9, 0.0, 0.0, False, False),
    (0.9, 0.0, 5e-4, True, False),
    (0.5, 0.1, 1e-2, False, True),
]


def sgd_case(shape, dtype, device, gen, mask_kind, contiguous, momentum):
    tensors = {
        "param": randn(shape, dtype, device, gen),
        "grad": randn(shape, dtype, device, gen),
        "momentum_buffer": randn(shape, dtype, device, gen) if momentum != 0 else None,
        "mask": make_mask(shape, mask_kind, device, gen) if mask_kind else None,
    }
    return {k: (maybe_non_contiguous(v, contiguous) if v is not None else None) for k, v in tensors.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", SGD_CONFIGS)
@pytest.mark.parametrize("mask_kind", ["random", "all_active", "all_inactive", None])
def test_fused_sgd_step_matches_reference(device, dtype, shape, config, mask_kind, gen):
    momentum, dampening, weight_decay, nesterov, maximize = config
    contiguous = mask_kind != "all_active"  # non-contiguous inputs get their share of cases
    ours = sgd_case(shape, dtype, device, gen, mask_kind, contiguous, momentum)
    theirs = {k: (v.clone() if v is not None else None) for k, v in ours.items()}
    hyper = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize)
    # Three steps: the first initialises the buffer the way torch.optim does.
    for step in range(3):
        for fn, t in ((sm.fused_sgd_step_, ours), (reference.fused_sgd_step_, theirs)):
            fn(t["param"], t["grad"], t["momentum_buffer"], t["mask"], **hyper,
               init_momentum_buffer=(step == 0 and momentum != 0))
    torch.testing.assert_close(ours["param"], theirs["param"], **tolerances(dtype))
    if momentum != 0:
        torch.testing.assert_close(ours["momentum_buffer"], theirs["momentum_buffer"], **tolerances(dtype))
    if mask_kind is not None:
        assert not ours["param"][~ours["mask"]].any()


def test_fused_sgd_updates_momentum_of_inactive_positions(gen):
    param, grad = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    buf = torch.randn(100, generator=gen)
    mask = torch.zeros(100, dtype=torch.bool)
    expected_buf = buf * 0.9 + grad
    sm.fused_sgd_step_(param, grad, buf, mask, lr=0.1, momentum=0.9)
    torch.testing.assert_close(buf, expected_buf)
    assert not param.any()


# --------------------------------------------------------------------------- fused Adam
ADAM_CONFIGS = [
    # weight_decay, decoupled, amsgrad, maximize, betas
    (0.0, False, False, False, (0.9, 0.999)),
    (1e-2, False, True, False, (0.9, 0.999)),
    (1e-2, True, False, True, (0.8, 0.99)),
    (1e-2, True, True, False, (0.6, 0.9)),  # lerp weight 0.4: the other branch of lerp
    (0.0, True, False, False, (0.0, 0.5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", ADAM_CONFIGS)
@pytest.mark.parametrize("mask_kind", ["random", "all_active", "all_inactive", None])
def test_fused_adam_step_matches_reference(device, dtype, shape, config, mask_kind, gen):
    weight_decay, decoupled, amsgrad, maximize, (beta1, beta2) = config
    contiguous = mask_kind != "random"
    make = lambda: maybe_non_contiguous(randn(shape, dtype, device, gen), contiguous)  # noqa: E731
    ours = {
        "param": make(),
        "grad": make(),
        "exp_avg": maybe_non_contiguous(torch.zeros(shape, dtype=dtype, device=device), contiguous),
        "exp_avg_sq": maybe_non_contiguous(torch.zeros(shape, dtype=dtype, device=device), contiguous),
        "max_exp_avg_sq": torch.zeros(shape, dtype=dtype, device=device) if amsgrad else None,
        "mask": make_mask(shape, mask_kind, device, gen) if mask_kind else None,
    }
    theirs = {k: (v.clone() if v is not None else None) for k, v in ours.items()}
    hyper = dict(lr=1e-2, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled, maximize=maximize)
    for step in range(1, 4):
        grad = randn(shape, dtype, device, gen)
        for fn, t in ((sm.fused_adam_step_, ours), (reference.fused_adam_step_, theirs)):
            t["grad"].copy_(grad)
            fn(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"], t["mask"],
               step=step, **hyper)
    for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if ours[name] is not None:
            torch.testing.assert_close(ours[name], theirs[name], **tolerances(dtype), msg=name)
    if mask_kind is not None:
        assert not ours["param"][~ours["mask"]].any()


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    for dtype, shape in itertools.product([torch.float32, torch.float64], [(5, 7), (0,), (3,)]):
        p = lambda: torch.randn(shape, generator=g, dtype=dtype).to(device)  # noqa: E731
        mask = (torch.rand(shape, generator=g) < 0.5).to(device)
        yield torch.ops.sparsemom.mask_apply_.default, (p(), mask)
        yield torch.ops.sparsemom.fused_sgd_step_.default, (p(), p(), p(), mask, 0.1, 0.9, 0.0, 1e-4, True, False, False)
        yield torch.ops.sparsemom.fused_sgd_step_.default, (p(), p(), None, None, 0.1, 0.0, 0.0, 0.0, False, True, False)
        yield torch.ops.sparsemom.fused_adam_step_.default, (p(), p(), p().abs(), p().abs(), p().abs(), mask, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, False, 3)
        yield torch.ops.sparsemom.fused_adam_step_.default, (p(), p(), p().abs(), p().abs(), None, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, True, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    assert run_opcheck(_opcheck_samples(device)) == 30
