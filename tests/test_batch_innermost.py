"""Activations kept batch innermost between csr convs (sparsemom_ext.nn.batch_innermost):
each module against its torch base on the same values, and a csr CNN trained with
keep_batch_innermost against the same CNN without it, eager and compiled."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.nn import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, CsrConv2d, MaxPool2d, is_batch_innermost,
                              keep_batch_innermost)

from conftest import seeded


def batch_innermost_copy(x):
    """The values of ``x`` stored (c, h, w, n), as a csr conv writes them."""
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def test_is_batch_innermost_tells_the_layouts_apart():
    x = torch.randn(4, 3, 5, 6)
    assert is_batch_innermost(batch_innermost_copy(x))
    assert not is_batch_innermost(x)
    assert not is_batch_innermost(x.to(memory_format=torch.channels_last))
    assert not is_batch_innermost(batch_innermost_copy(x[:1]))  # one image: also contiguous
    assert not is_batch_innermost(torch.randn(4, 3))


MODULES = {
    "batch_norm": lambda: (nn.BatchNorm2d(3), BatchNorm2d(3)),
    "batch_norm_no_affine_momentum_none": lambda: (nn.BatchNorm2d(3, affine=False, momentum=None),
                                                   BatchNorm2d(3, affine=False, momentum=None)),
    "max_pool_2": lambda: (nn.MaxPool2d(2), MaxPool2d(2)),
    "max_pool_3_s2_p1_ceil": lambda: (nn.MaxPool2d(3, 2, 1, ceil_mode=True), MaxPool2d(3, 2, 1, ceil_mode=True)),
    "avg_pool_2": lambda: (nn.AvgPool2d(2), AvgPool2d(2)),
    "avg_pool_3_p1": lambda: (nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                              AvgPool2d(3, 1, 1, count_include_pad=False)),
    "adaptive_avg_pool_1": lambda: (nn.AdaptiveAvgPool2d(1), AdaptiveAvgPool2d(1)),
    "adaptive_avg_pool_3x2": lambda: (nn.AdaptiveAvgPool2d((3, 2)), AdaptiveAvgPool2d((3, 2))),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(MODULES))
def test_each_module_computes_its_torch_base_on_both_layouts(name, training):
    torch.manual_seed(0)
    base, ours = MODULES[name]()
    ours.load_state_dict(base.state_dict())
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    base, ours = base.double().train(training), ours.double().train(training)
    g = torch.randn_like(base(x))
    base.load_state_dict(ours.state_dict())  # undo the running statistics of the line above
    expected_x = x.clone().requires_grad_()
    expected = base(expected_x)
    expected.backward(g)
    for layout_of in (batch_innermost_copy, lambda t: t.clone()):  # the fast path, then torch's own
        run = copy.deepcopy(ours)
        inp = layout_of(x).requires_grad_()
        out = run(inp)
        assert is_batch_innermost(out) == is_batch_innermost(inp)
        out.backward(g)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inp.grad, expected_x.grad, rtol=1e-12, atol=1e-12)
        for key, value in base.state_dict().items():  # running mean / var / batches tracked
            torch.testing.assert_close(run.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def test_max_pool_with_indices_on_both_layouts():
    x = torch.randn(4, 3, 6, 6)
    out, idx = nn.MaxPool2d(2, return_indices=True)(x)
    got, got_idx = MaxPool2d(2, return_indices=True)(batch_innermost_copy(x))
    assert torch.equal(got, out) and torch.equal(got_idx, idx)
    assert is_batch_innermost(got)


def cnn(dtype=torch.float64, seed=0):
    """conv-bn-relu-pool, conv-bn-relu, adaptive pool, linear: the modules swapped, as in VGG / WRN."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).to(dtype)
    return sm.sparsify(model, density=0.3, layout="csr", generator=seeded(seed + 1))


def test_keep_batch_innermost_swaps_the_modules_and_keeps_their_state():
    model = cnn()
    bn = model[1]
    bn.register_forward_hook(lambda *_: None)
    keys = list(model.state_dict())
    assert keep_batch_innermost(model) is model
    assert [type(m) for m in model] == [CsrConv2d, BatchNorm2d, nn.ReLU, MaxPool2d, CsrConv2d, BatchNorm2d, nn.ReLU,
                                        AdaptiveAvgPool2d, nn.Flatten, sm.nn.CsrLinear]
    assert model[1] is bn and isinstance(bn, nn.BatchNorm2d) and len(bn._forward_hooks) == 1
    assert all(m.output_layout == "batch_innermost" for m in model if isinstance(m, CsrConv2d))
    assert list(model.state_dict()) == keys
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        keep_batch_innermost("model")


def train(model, steps=7, compile_model=False):
    """The README's loop with the engine (an update every 3 steps); returns the losses."""
    g = seeded(5)
    batches = [(torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(5, (6,), generator=g))
               for _ in range(steps)]
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    engine = sm.SparseMomentum(model, optimizer, update_every=3, total_steps=steps)
    run = torch.compile(model, fullgraph=True) if compile_model else model
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        engine.step()
        losses.append(loss.item())
    assert engine.updates == 2
    return losses


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_a_csr_cnn_trains_the_same_with_and_without_the_layout_kept(compile_model):
    torch._dynamo.reset()
    plain, kept = cnn(), keep_batch_innermost(cnn())
    expected = train(plain)
    losses = train(kept, compile_model=compile_model)
    assert losses == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for a, b in zip(plain.state_dict().values(), kept.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_in_place_ops_after_the_batch_norm_stay_in_place_and_match_torch(training):
    """A ResNet block's tail, ``out = bn(x); out += identity; out.relu_()``: the batch norm's
    batch-innermost output is not a view, so autograd records the in-place ops themselves
    (a view would make each a CopySlices: a copy of the gradient to contiguous order and back)."""
    torch.manual_seed(0)
    base = nn.BatchNorm2d(3).double().train(training)
    ours = BatchNorm2d(3).double().train(training)
    base.running_mean.uniform_(-1, 1)
    base.running_var.uniform_(0.5, 2)
    ours.load_state_dict(base.state_dict())
    x, identity, g = (torch.randn(5, 3, 4, 6, dtype=torch.float64) for _ in range(3))

    def tail(bn, layout_of):
        inp = layout_of(x).requires_grad_()
        out = bn(inp)
        out += layout_of(identity)
        out.relu_()
        out.backward(layout_of(g))
        return out, inp.grad

    expected, expected_grad = tail(base, lambda t: t.clone())
    out, grad = tail(ours, batch_innermost_copy)
    assert is_batch_innermost(out) and type(out.grad_fn).__name__ == "ReluBackward0"
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)
