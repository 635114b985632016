"""SparseLinear / SparseConv2d against nn.Linear / nn.Conv2d; sparsify(); density_report()."""

import copy
import io

import pytest
import torch
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.nn import DensityReport, SparseConv2d, SparseLinear, density_report, sparsify
from sparsemom_ext.sparsity.init import layer_counts

from conftest import DEVICES


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_masked(layer):
    """The invariants of a mask-layout layer."""
    assert layer.mask.dtype == torch.bool
    assert layer.mask.shape == layer.weight.shape
    assert sm.mask_of(layer.weight) is layer.mask
    assert not layer.weight.detach()[~layer.mask].any()


# ---------------------------------------------------------------- the layers

def test_dense_sparse_linear_is_exactly_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(20, 30)
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    ours = SparseLinear(20, 30)
    after_ours = torch.rand(3)
    assert torch.equal(after_ref, after_ours), "the constructor must use the RNG like nn.Linear"
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    x = torch.randn(5, 20)
    assert torch.equal(ours(x), ref(x))
    assert list(ours.state_dict()) == list(ref.state_dict()) + ["mask"]
    assert ours.mask.all() and ours.density == 1.0 and ours.nnz == 600
    assert_masked(ours)


def test_dense_sparse_conv2d_is_exactly_nn_conv2d():
    kwargs = dict(stride=2, padding=1, dilation=1, groups=2, bias=True, padding_mode="reflect")
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, 3, **kwargs)
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    ours = SparseConv2d(4, 6, 3, **kwargs)
    assert torch.equal(after_ref, torch.rand(3))
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(ours(x), ref(x))
    assert list(ours.state_dict()) == list(ref.state_dict()) + ["mask"]
    assert_masked(ours)


def test_sparse_linear_has_the_exact_count_and_zeros_elsewhere():
    layer = SparseLinear(20, 30, density=0.1, generator=seeded())
    assert layer.nnz == 60 and layer.density == pytest.approx(0.1)
    assert_masked(layer)
    assert layer.weight.detach()[layer.mask].ne(0).all()  # active weights keep their init
    x = torch.randn(4, 20)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dense_weight(), layer.bias))


def test_same_generator_seed_same_mask():
    a = SparseLinear(20, 30, density=0.2, generator=seeded(1))
    b = SparseLinear(20, 30, density=0.2, generator=seeded(1))
    c = SparseLinear(20, 30, density=0.2, generator=seeded(2))
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_density_rounding_to_zero_weights_leaves_the_bias():
    layer = SparseLinear(10, 10, density=0.004)  # 0.4 weights rounds to 0
    assert layer.nnz == 0 and layer.density == 0.0
    assert not layer.weight.detach().any()
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), layer.bias.detach().expand(3, 10))


@pytest.mark.parametrize("cls,args", [(SparseLinear, (4, 5)), (SparseConv2d, (2, 3, 3))])
@pytest.mark.parametrize("density,error", [(0, ValueError), (0.0, ValueError), (-0.5, ValueError),
                                           (1.5, ValueError), (float("nan"), ValueError),
                                           (True, TypeError), ("0.5", TypeError), (None, TypeError)])
def test_bad_density(cls, args, density, error):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(error, match="density"):
        cls(*args, density=density)
    assert torch.equal(torch.get_rng_state(), state), "a rejected call must draw nothing"


@pytest.mark.parametrize("cls,args", [(SparseLinear, (4, 5)), (SparseConv2d, (2, 3, 3))])
def test_bad_layout_and_generator(cls, args):
    bad = ("dense", None, "CSR") + (("csr",) if cls is SparseConv2d else ())
    for layout in bad:
        with pytest.raises(ValueError, match="layout") as info:
            cls(*args, density=0.5, layout=layout)
        assert "'mask'" in str(info.value)
    with pytest.raises(TypeError, match="generator"):
        cls(*args, density=0.5, generator=1234)


def test_extra_repr_and_dense_weight():
    layer = SparseLinear(20, 30, density=0.25, generator=seeded())
    text = repr(layer)
    assert "density=0.25" in text and "layout=mask" in text and "in_features=20" in text
    dense = layer.dense_weight()
    assert not dense.requires_grad
    assert dense.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(dense, layer.weight.detach() * layer.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_dense_linear_keeps_active_values(dtype):
    dense = nn.Linear(16, 12, dtype=dtype)
    original = dense.weight.detach().clone()
    layer = SparseLinear.from_dense(dense, density=0.25, generator=seeded())
    assert type(layer) is SparseLinear
    assert layer.weight.dtype == dtype and layer.weight.device == dense.weight.device
    assert layer.nnz == 48
    assert torch.equal(layer.weight.detach()[layer.mask], original[layer.mask])
    assert not layer.weight.detach()[~layer.mask].any()
    assert torch.equal(layer.bias, dense.bias)
    assert torch.equal(dense.weight, original), "from_dense must not modify its input"
    assert layer.weight is not dense.weight
    assert_masked(layer)
    with pytest.raises(TypeError, match="module"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 3), density=0.5)


def test_from_dense_conv_keeps_every_argument():
    dense = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False,
                      padding_mode="circular").eval()
    layer = SparseConv2d.from_dense(dense, density=0.5, generator=seeded())
    assert not layer.training and layer.bias is None
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(dense, attr)
    assert layer.nnz == 36
    with torch.no_grad():
        dense.weight.mul_(layer.mask)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(layer(x), dense(x))


CONV_ARGS = [
    dict(),
    dict(stride=2),
    dict(padding=1),
    dict(padding="same"),
    dict(padding="valid"),
    dict(dilation=2, padding=2),
    dict(groups=2),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=(2, 1), padding_mode="replicate"),
    dict(padding=1, padding_mode="circular", stride=(1, 2)),
    dict(bias=False),
    dict(kernel_size=(3, 1), groups=4, stride=(2, 1)),
]


@pytest.mark.parametrize("kwargs", CONV_ARGS, ids=[str(k) for k in CONV_ARGS])
def test_conv_arguments_match_nn_conv2d_with_the_masked_weight(kwargs):
    kwargs = dict(kwargs)
    kernel_size = kwargs.pop("kernel_size", 3)
    layer = SparseConv2d(4, 8, kernel_size, density=0.3, generator=seeded(), **kwargs)
    ref = nn.Conv2d(4, 8, kernel_size, **kwargs)
    with torch.no_grad():
        ref.weight.copy_(layer.dense_weight())
        if ref.bias is not None:
            ref.bias.copy_(layer.bias)
    assert layer.nnz == round(0.3 * layer.weight.numel())
    assert_masked(layer)
    x = torch.randn(2, 4, 10, 11)
    assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("convert", [
    lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.float(),
    lambda m: m.type(torch.float64), lambda m: m.cpu(), lambda m: m.to("cpu", torch.bfloat16),
], ids=["double", "to_float64", "half", "float", "type", "cpu", "to_cpu_bf16"])
def test_conversions_keep_the_mask_attached(convert):
    layer = SparseLinear(8, 6, density=0.5, generator=seeded())
    mask = layer.mask.clone()
    out = convert(layer)
    assert out is layer
    assert_masked(layer)
    assert torch.equal(layer.mask, mask)


@pytest.mark.parametrize("future", ["overwrite", "swap"])
def test_conversions_that_replace_the_parameter_keep_the_mask_attached(future):
    # Under these torch.__future__ flags .double() makes new Parameter objects (or swaps
    # their contents), which loses an attribute set on the old one.
    get = getattr(torch.__future__, f"get_{future}_module_params_on_conversion")
    set_ = getattr(torch.__future__, f"set_{future}_module_params_on_conversion")
    old = get()
    set_(True)
    try:
        layer = SparseLinear(8, 6, density=0.5, generator=seeded()).double()
        assert layer.weight.dtype == torch.float64
        assert_masked(layer)
    finally:
        set_(old)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moving_to_cuda_keeps_the_mask_attached():
    layer = SparseConv2d(3, 4, 3, density=0.4, generator=seeded()).cuda()
    assert layer.mask.is_cuda and sm.mask_of(layer.weight) is layer.mask
    assert_masked(layer)
    again = SparseConv2d(3, 4, 3, density=0.4, generator=seeded(), device="cuda")
    assert torch.equal(again.mask, layer.mask), "the mask must not depend on the device"


def test_load_state_dict_round_trip_keeps_the_attachment():
    src = SparseLinear(12, 10, density=0.3, generator=seeded(1))
    dst = SparseLinear(12, 10, density=0.3, generator=seeded(2))
    assert not torch.equal(src.mask, dst.mask)
    mask_object, weight_object = dst.mask, dst.weight
    dst.load_state_dict(src.state_dict())
    assert dst.mask is mask_object and dst.weight is weight_object  # copied in place
    assert torch.equal(dst.mask, src.mask) and torch.equal(dst.weight, src.weight)
    assert_masked(dst)

    fresh = SparseLinear(12, 10, density=0.3, generator=seeded(3))
    fresh.load_state_dict(copy.deepcopy(src.state_dict()), assign=True)  # replaces the tensors
    assert torch.equal(fresh.mask, src.mask)
    assert_masked(fresh)


def test_load_state_dict_zeros_weights_outside_the_loaded_mask():
    src = SparseLinear(12, 10, density=0.3, generator=seeded(1))
    state = src.state_dict()
    state["weight"] = torch.ones(10, 12)
    dst = SparseLinear(12, 10, density=0.3, generator=seeded(2))
    dst.load_state_dict(state)
    assert torch.equal(dst.weight.detach(), src.mask.float())


def test_deepcopy_and_pickle_keep_the_attachment():
    layer = SparseConv2d(3, 4, 3, density=0.4, generator=seeded())
    clone = copy.deepcopy(layer)
    assert clone.mask is not layer.mask and torch.equal(clone.mask, layer.mask)
    assert_masked(clone)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_masked(loaded)


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_fused_sgd_keeps_inactive_weights_zero(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        SparseConv2d(1, 4, 3, density=0.5, generator=seeded(1)), nn.ReLU(), nn.Flatten(),
        SparseLinear(4 * 6 * 6, 5, density=0.2, generator=seeded(2)),
    ).to(device)
    before = [m.weight.detach().clone() for m in (model[0], model[3])]
    optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 1, 8, 8, device=device)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    for layer, old in zip((model[0], model[3]), before):
        assert_masked(layer)
        assert not torch.equal(layer.weight.detach()[layer.mask], old[layer.mask]), "active weights must train"
        # Momentum is kept dense: the growth signal of sparse momentum.
        assert optimizer.state[layer.weight]["momentum_buffer"][~layer.mask].ne(0).any()


# ---------------------------------------------------------------- sparsify

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


LAYER_NAMES = ["features.0", "features.4", "fc1", "fc2", "fc3"]


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_sparsify_replaces_layers_with_exact_counts(distribution):
    model = make_net()
    dense = make_net()
    bn = model.features[1]
    bn_state = copy.deepcopy(bn.state_dict())
    out = sparsify(model, density=0.1, distribution=distribution, generator=seeded())
    assert out is model
    modules = dict(model.named_modules())
    assert [type(modules[n]) for n in LAYER_NAMES] == [SparseConv2d, SparseConv2d, SparseLinear, SparseLinear,
                                                        SparseLinear]
    assert model.features[1] is bn and type(bn) is nn.BatchNorm2d
    assert all(torch.equal(v, bn_state[k]) for k, v in bn.state_dict().items())
    dense_modules = dict(dense.named_modules())
    shapes = [dense_modules[n].weight.shape for n in LAYER_NAMES]
    expected = layer_counts(shapes, 0.1, distribution)
    assert [modules[n].nnz for n in LAYER_NAMES] == expected
    assert sum(expected) == round(0.1 * sum(s.numel() for s in shapes))
    for name in LAYER_NAMES:
        layer, ref = modules[name], dense_modules[name]
        assert_masked(layer)
        assert torch.equal(layer.weight.detach()[layer.mask], ref.weight.detach()[layer.mask])
        assert torch.equal(layer.bias, ref.bias)
        with torch.no_grad():
            ref.weight.mul_(layer.mask)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), dense(x))


def test_sparsify_same_seed_same_masks():
    a = sparsify(make_net(), 0.2, "erk", generator=seeded(5))
    b = sparsify(make_net(), 0.2, "erk", generator=seeded(5))
    c = sparsify(make_net(), 0.2, "erk", generator=seeded(6))
    masks = [[m.mask for m in net.modules() if isinstance(m, (SparseLinear, SparseConv2d))] for net in (a, b, c)]
    assert all(torch.equal(x, y) for x, y in zip(masks[0], masks[1]))
    assert not all(torch.equal(x, y) for x, y in zip(masks[0], masks[2]))


def test_sparsify_exclude_by_name_and_class():
    model = make_net()
    fc3 = model.fc3
    sparsify(model, 0.1, exclude=("fc3", "features.0"))
    assert model.fc3 is fc3 and type(model.fc3) is nn.Linear
    assert type(model.features[0]) is nn.Conv2d and type(model.features[4]) is SparseConv2d
    # Excluded layers do not count: the converted ones hold the exact density among themselves.
    converted = [model.features[4], model.fc1, model.fc2]
    assert sum(m.nnz for m in converted) == round(0.1 * sum(m.weight.numel() for m in converted))

    model = sparsify(make_net(), 0.1, exclude=nn.Conv2d)  # a bare class, not in a tuple
    assert type(model.features[0]) is nn.Conv2d and type(model.features[4]) is nn.Conv2d
    assert type(model.fc1) is SparseLinear

    model = sparsify(make_net(), 0.1, exclude="features")  # a container keeps its children dense
    assert type(model.features[0]) is nn.Conv2d and type(model.features[4]) is nn.Conv2d
    assert type(model.fc3) is SparseLinear

    model = sparsify(make_net(), 0.1, exclude=[nn.Sequential, "fc2"])  # a class of an ancestor
    assert [type(m) for m in (model.features[0], model.fc1, model.fc2, model.fc3)] == [
        nn.Conv2d, SparseLinear, nn.Linear, SparseLinear]

    with pytest.raises(ValueError, match="fc4"):
        sparsify(make_net(), 0.1, exclude=("fc4",))
    with pytest.raises(TypeError, match="exclude"):
        sparsify(make_net(), 0.1, exclude=(3,))


def test_sparsify_errors():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsify(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 0.1)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsify(make_net(), 0.1, exclude=(nn.Linear, nn.Conv2d))
    model = sparsify(make_net(), 0.1)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsify(model, 0.1)  # everything is sparse already
    for density in (0, 1.2, float("nan")):
        with pytest.raises(ValueError, match="density"):
            sparsify(make_net(), density)
    for density in (True, "0.1", None):
        with pytest.raises(TypeError, match="density"):
            sparsify(make_net(), density)
    with pytest.raises(ValueError, match="distribution"):
        sparsify(make_net(), 0.1, distribution="random")
    with pytest.raises(ValueError, match="layout"):
        sparsify(make_net(), 0.1, layout="dense")
    with pytest.raises(ValueError, match="nn.Linear only; features.0, features.4 are nn.Conv2d"):
        sparsify(make_net(), 0.1, layout="csr")
    with pytest.raises(TypeError, match="model"):
        sparsify([nn.Linear(2, 2)], 0.1)
    with pytest.raises(ValueError, match="forward pass"):
        sparsify(nn.Sequential(nn.LazyLinear(4)), 0.1)
    model = make_net()
    with pytest.raises(ValueError, match="density"):
        sparsify(model, 2.0)
    assert type(model.fc1) is nn.Linear, "a rejected call must leave the model as it was"


def test_sparsify_refuses_tied_weights_and_custom_forward():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

    with pytest.raises(ValueError, match="head.weight"):
        sparsify(Tied(), 0.5)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="exclude"):
        sparsify(model, 0.5)
    sparsify(model, 0.5, exclude=Scaled)
    assert type(model[0]) is Scaled and type(model[1]) is SparseLinear


def test_sparsify_shared_module_and_root_layer():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model, 0.5)
    assert type(model[0]) is SparseLinear and model[0] is model[2]
    assert model[0].nnz == 18

    root = sparsify(nn.Linear(10, 10), 0.3)
    assert type(root) is SparseLinear and root.nnz == 30


# ---------------------------------------------------------------- density_report

def test_density_report_numbers_and_table():
    model = sparsify(make_net(), 0.1, "er", exclude=("fc3",), generator=seeded())
    report = density_report(model)
    assert isinstance(report, DensityReport)
    names = ["features.0", "features.4", "fc1", "fc2"]
    assert [r.name for r in report.rows] == names
    modules = dict(model.named_modules())
    for row in report.rows:
        layer = modules[row.name]
        assert row.kind == type(layer).__name__
        assert row.shape == tuple(layer.weight.shape)
        assert row.nnz == int(layer.mask.sum()) and row.numel == layer.weight.numel()
        assert row.density == pytest.approx(row.nnz / row.numel)
    numel = sum(modules[n].weight.numel() for n in names)
    assert report.total.nnz == round(0.1 * numel) and report.total.numel == numel
    assert report.total_density == pytest.approx(round(0.1 * numel) / numel)
    text = str(report)
    for name in names + ["total", "SparseConv2d", "SparseLinear", "6x1x5x5"]:
        assert name in text
    assert "fc3" not in text
    lines = text.splitlines()
    assert len({len(line) for line in lines if not line.startswith("-")}) <= 2  # aligned columns
    assert report.to_dict()["total"]["nnz"] == report.total.nnz


def test_density_report_without_sparse_layers():
    report = density_report(make_net())
    assert report.rows == () and report.total.numel == 0 and report.total_density == 0.0
    assert "no sparse layers" in str(report)
