"""torch.compile, torch.export, torch.jit.trace, autocast and double backward, as users call them.

The compiled tests train an eager and a compiled copy of the same sparse model side by side,
with the engine's topology updates inside the loop, and compare them step by step.
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparsemom_ext as sm

from conftest import seeded

# Growths that read batches arm their layers' taps with three combinations of signals (none;
# GraBo's factors or RigL's dense gradient; the open window's candidates), each compiled once
# with static sizes and once with symbolic ones after the first topology change; no more
# however many updates follow (the tests run 8).
GRAPHS = 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled code is counted per code object (nn.Sequential.forward) against dynamo's
    # recompile limit across the whole process; each test starts from none.
    torch._dynamo.reset()


def wide_mlp(layout, density=0.05):
    # 256 x 512: large and sparse enough that the mask layout's backend="auto" runs the
    # sparse kernels in eager mode, so the compiled graph's dense path is compared to them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    return sm.sparsify(model, density=density, layout=layout, generator=seeded(1))


def small_cnn(layout, density=0.2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    return sm.sparsify(model, density=density, layout=layout, generator=seeded(1))


def mlp_batch(data):
    return torch.randn(32, 256, generator=data), torch.randint(0, 10, (32,), generator=data)


def image_batch(data):
    return torch.randn(16, 3, 8, 8, generator=data), torch.randint(0, 10, (16,), generator=data)


def trainer(model, growth, sampling="grabo"):
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    engine = sm.SparseMomentum(model, optimizer, prune_rate=0.3, update_every=3, total_steps=40, growth=growth,
                               window=2, sampling=sampling)
    return optimizer, engine


def train_side_by_side(layout, growth, steps=13, make_model=wide_mlp, make_batch=mlp_batch, sampling="grabo",
                       **compile_args):
    """Losses of an eager and a compiled copy trained alike; the number of graphs compiled."""
    eager = make_model(layout)
    compiled = copy.deepcopy(eager)
    runs = [(eager, eager, *trainer(eager, growth, sampling)),
            (compiled, torch.compile(compiled, **compile_args), *trainer(compiled, growth, sampling))]
    counters.clear()
    data = seeded(5)
    loss_fn = nn.CrossEntropyLoss()
    losses = [[], []]
    for _ in range(steps):
        x, y = make_batch(data)
        for (model, forward, optimizer, engine), record in zip(runs, losses):
            optimizer.zero_grad()
            loss = loss_fn(forward(x), y)
            loss.backward()
            optimizer.step()
            engine.step()
            record.append(loss.item())
    assert runs[0][3].updates == runs[1][3].updates == steps // 3
    assert [r.nnz for r in runs[0][3].history] == [r.nnz for r in runs[1][3].history]
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return losses, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("layout,growth", [("mask", "momentum"), ("mask", "gradient"), ("csr", "random")])
def test_fullgraph_training_with_updates_equals_eager_in_two_graphs(layout, growth):
    (eager, compiled), graphs = train_side_by_side(layout, growth, fullgraph=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    # csr: the first update changes nnz, which then becomes symbolic; mask: shapes never change.
    assert graphs <= 2, graphs


def test_fullgraph_training_of_a_csr_cnn_with_updates_equals_eager_in_two_graphs():
    (eager, compiled), graphs = train_side_by_side("csr", "random", make_model=small_cnn, make_batch=image_batch,
                                                   fullgraph=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert graphs <= 2, graphs


@pytest.mark.parametrize("layout,growth,sampling", [("csr", "momentum", "grabo"), ("csr", "momentum", "uniform"),
                                                    ("csr", "gradient", "grabo"), ("csr", "gse", "grabo"),
                                                    ("mask", "gse", "grabo")])
def test_fullgraph_training_with_growths_that_read_batches_equals_eager(layout, growth, sampling):
    # Their signals come from the layers' gradient taps, which the compiled graph captures:
    # a graph per combination of armed signals, each made once candidate counts are symbolic.
    (eager, compiled), graphs = train_side_by_side(layout, growth, steps=25, fullgraph=True, sampling=sampling)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert graphs <= GRAPHS, graphs


def test_fullgraph_training_of_a_csr_cnn_with_momentum_growth_equals_eager():
    (eager, compiled), graphs = train_side_by_side("csr", "momentum", steps=25, make_model=small_cnn,
                                                   make_batch=image_batch, fullgraph=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert graphs <= GRAPHS, graphs


def test_the_sparse_backend_cannot_be_captured_and_says_so():
    layer = sm.SparseLinear(64, 32, density=0.1, backend="sparse")
    with pytest.raises(Exception, match="backend='sparse'\\) cannot be captured"):
        torch.compile(layer, fullgraph=True)(torch.randn(4, 64))


@pytest.mark.parametrize("layout", ["mask", "csr"])
@pytest.mark.parametrize("strict", [False, True])
def test_export_equals_eager(layout, strict):
    model = wide_mlp(layout).eval()
    x = torch.randn(8, 256, generator=seeded(2))
    program = torch.export.export(model, (x,), strict=strict)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["mask", "csr"])
def test_jit_trace_equals_eager(layout):
    model = wide_mlp(layout).eval()
    x = torch.randn(8, 256, generator=seeded(2))
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(torch.randn(8, 256, generator=seeded(3))),
                               model(torch.randn(8, 256, generator=seeded(3))), rtol=1e-5, atol=1e-6)


def test_export_and_trace_in_the_middle_of_training_leave_the_engines_taps_out():
    # A user exports (or traces) the model between training steps, the momentum window open
    # and its layers' taps armed: the graph is the model's alone, and training goes on.
    model = wide_mlp("csr")
    optimizer, engine = trainer(model, "momentum")
    data = seeded(5)
    for _ in range(2):
        x, y = mlp_batch(data)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        engine.step()
    assert engine.growth_method.windows and all(m.gradient_tap.armed for m in model if hasattr(m, "values"))
    x = torch.randn(8, 256, generator=seeded(2))
    expected = model(x)
    program = torch.export.export(model, (x,))
    assert "_Tap" not in str(program.graph_module.code)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.jit.trace(model, (x,))(x), expected, rtol=1e-5, atol=1e-6)
    x, y = mlp_batch(data)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    engine.step()
    assert engine.updates == 1


# ---------------------------------------------------------------- autocast
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["mask", "csr"])
def test_autocast_training_steps(layout, dtype, device):
    model = wide_mlp(layout, density=0.1).to(device)
    reference = copy.deepcopy(model)
    optimizer, engine = trainer(model, "gse")  # its taps read the low-precision batches of steps 2 and 3
    x = torch.randn(16, 256, generator=seeded(4)).to(device)
    y = torch.randint(0, 10, (16,), generator=seeded(4)).to(device)
    for step in range(3):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
        assert out.dtype == dtype  # as nn.Linear gives under autocast
        loss.backward()
        sparse = [p for p in model.parameters() if p.grad is not None]
        assert sparse and all(p.grad.dtype == torch.float32 for p in sparse)  # the parameters stay float32
        if step == 0:
            torch.testing.assert_close(out.float(), reference(x), rtol=0.05, atol=0.05)
        optimizer.step()
        engine.step()
    assert engine.updates == 1 and sum(r.grown for r in engine.history) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_autocast_csr_linear_accumulates_in_float32():
    layer = sm.CsrLinear.from_dense(nn.Linear(2048, 8), density=0.5, generator=seeded(0))
    x = torch.randn(4, 2048, generator=seeded(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    # The exact product of the bf16-rounded operands, accumulated in float64: a bf16
    # accumulation over ~1000 terms per output would be off by far more than one bf16 rounding.
    exact = nn.functional.linear(x.bfloat16().double(), layer.dense_weight().bfloat16().double(),
                                 layer.bias.bfloat16().double())
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=1e-2)


# ---------------------------------------------------------------- double backward
@pytest.mark.parametrize("layout", ["csr", "mask-sparse"])
def test_double_backward_is_refused_clearly(layout):
    dense = nn.Linear(16, 8, dtype=torch.float64)
    layer = (sm.CsrLinear.from_dense(dense, density=0.5, generator=seeded(0)) if layout == "csr"
             else sm.SparseLinear.from_dense(dense, density=0.5, generator=seeded(0)))
    if layout != "csr":
        layer.backend = "sparse"
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x).square().sum()
    with pytest.raises(RuntimeError, match="has no double backward"):
        torch.autograd.grad(out, x, create_graph=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x)  # first order still works
    assert grad.shape == x.shape and grad.abs().sum() > 0



def test_two_compiled_models_of_one_class_each_tap_their_own_layers():
    # Compiled code is shared by models of one class: each model's taps (armed differently
    # by different growths) must be its own, never another model's baked into a graph.
    pairs = []
    for growth in ("momentum", "gradient"):
        eager = wide_mlp("csr")
        compiled = copy.deepcopy(eager)
        pairs.append([(eager, eager, *trainer(eager, growth)),
                      (compiled, torch.compile(compiled, fullgraph=True), *trainer(compiled, growth))])
    data = seeded(5)
    for _ in range(10):
        x, y = mlp_batch(data)
        for pair in pairs:
            for model, forward, optimizer, engine in pair:
                optimizer.zero_grad()
                nn.functional.cross_entropy(forward(x), y).backward()
                optimizer.step()
                engine.step()
    for (eager, *_, eager_engine), (compiled, *_, compiled_engine) in pairs:
        assert eager_engine.updates == compiled_engine.updates == 3
        for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
