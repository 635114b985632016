"""Shared test tables (devices, dtypes, shapes, tolerances) and the small sparse models the engine tests train."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsemom_ext as sm  # also registers torch.ops.sparsemom
from sparsemom_ext.csr_structure import flat_indices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Shapes every elementwise op is checked on: empty, one element, odd sizes that
# leave vector-loop tails, a 4-d conv-like weight, and one large enough to be
# split over threads (> 32768 elements).
SHAPES = [(0,), (1,), (7,), (33, 65), (4, 3, 3, 3), (300, 257)]

MASK_KINDS = ["random", "all_active", "all_inactive"]


def make_mask(shape, kind, device, generator=None):
    if kind == "all_active":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "all_inactive":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return (torch.rand(shape, generator=generator) < 0.3).to(device)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor with the values and shape of ``t`` (a strided view)."""
    big = torch.zeros(t.shape + (2,), dtype=t.dtype, device=t.device)
    big[..., 0] = t
    view = big[..., 0]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def tolerances(dtype):
    """assert_close tolerances of a kernel vs the reference for ``dtype``.

    Both compute in the same opmath precision; they can differ where torch's own
    ops (used by the reference) contract a multiply-add into an FMA, by about one
    rounding of the storage dtype.
    """
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    }[dtype]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def run_opcheck(samples) -> int:
    """torch.library.opcheck on every (op, args) sample; returns how many were checked."""
    count = 0
    for op, args in samples:
        torch.library.opcheck(op, args)
        count += 1
    return count


def train_steps(model, optimizer, engine, steps, seed=3, batch=8):
    """``steps`` training steps of ``model`` (a Sequential whose first layer is linear) on
    seeded random batches in the model's dtype, loss = mean square of the output; the
    engine, if any, steps after the optimizer."""
    g = torch.Generator().manual_seed(seed)
    n_in = model[0].in_features
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(batch, n_in, generator=g, dtype=dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if engine is not None:
            engine.step()


# ---------------------------------------------------------------- sparse layers against F.linear
def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def check_against_dense(layer, x, weight=None):
    """Forward and backward of ``layer`` equal F.linear with ``weight`` (default: the
    layer's dense weight) and its bias; returns the dense weight's gradient."""
    weight = (layer.dense_weight() if weight is None else weight).detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x = x.detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y_ref = F.linear(x_ref, weight, bias)
    assert y.shape == y_ref.shape
    close(y, y_ref)
    grad_y = torch.randn(y.shape, generator=seeded(99), dtype=y.dtype)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    close(x.grad, x_ref.grad)
    close(layer.bias.grad, bias.grad)
    return weight.grad


# ---------------------------------------------------------------- sparse models for the engine tests
def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(layout, sizes=(12, 20, 16, 6), density=0.3, seed=0, dtype=torch.float64, connectivity="floor"):
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out, dtype=dtype), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    return sm.sparsify(model, density=density, layout=layout, generator=seeded(seed + 1),
                       connectivity=connectivity)


def rows_without_input(mask):
    """How many rows (output units) of a weight's bool mask hold no active position."""
    return int((~mask.reshape(mask.shape[0], -1).any(dim=1)).sum())


def make_optimizer(name, params):
    return {
        "sgd": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        "nesterov": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        "sm_sgd": lambda: sm.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
        "sm_adamw": lambda: sm.optim.AdamW(params, lr=1e-2),
    }[name]()


def check_structure(layer):
    """The csr layer's (CsrLinear's, CsrConv2d's) invariants: canonical structure, matching
    transpose, finite values, zeros in the idle slots of the fixed capacity."""
    row_ptr, col_idx = layer.structure()
    assert row_ptr[0] == 0 and row_ptr[-1] == layer.nnz == col_idx.numel() <= layer.capacity
    assert layer.values.numel() == layer.capacity and not layer.values[layer.nnz:].any()
    assert bool((row_ptr.diff() >= 0).all())
    flat = flat_indices(row_ptr, col_idx, layer.n_cols)
    assert bool((flat.diff() > 0).all()), "columns sorted and distinct within each row"
    assert bool(((col_idx >= 0) & (col_idx < layer.n_cols)).all())
    for cached, fresh in zip((layer.col_ptr, layer.row_idx[: layer.nnz], layer.perm[: layer.nnz]),
                             sm.ops.csr_transpose(row_ptr, col_idx, layer.n_cols)):
        assert torch.equal(cached, fresh)
    assert int(layer.mask.sum()) == layer.nnz
    assert bool(torch.isfinite(layer.values).all())
