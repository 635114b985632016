"""Bad input gets an error naming the argument, and nothing is modified."""

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
