"""sparsify() in both layouts, to_layout() between them, and density_report()."""

import copy
import math

import pytest
import torch
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.nn import (CsrLinear, DensityReport, SparseConv2d, SparseLinear, density_report, sparsify,
                              to_layout)
from sparsemom_ext.sparsity.init import layer_counts


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_masked(layer):
    """The invariants of a mask-layout layer."""
    assert layer.mask.dtype == torch.bool
    assert layer.mask.shape == layer.weight.shape
    assert sm.mask_of(layer.weight) is layer.mask
    assert not layer.weight.detach()[~layer.mask].any()


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
    grouped = make_net()
    grouped.features[4] = nn.Conv2d(6, 16, 5, groups=2)
    with pytest.raises(ValueError, match=r"cannot convert features\.4 .*groups must be 1.*exclude=.*layout='mask'"):
        sparsify(grouped, 0.1, layout="csr")
    assert type(grouped.features[0]) is nn.Conv2d and type(grouped.fc1) is nn.Linear, "nothing converted"
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
    # Every weight of the model is counted: the excluded fc3 as a dense row (the
    # BatchNorm's 1-D scale is no weight matrix and is not).
    assert [r.name for r in report.rows] == names + ["fc3"]
    modules = dict(model.named_modules())
    for row in report.rows[:-1]:
        layer = modules[row.name]
        assert row.kind == type(layer).__name__ and row.sparse
        assert row.shape == tuple(layer.weight.shape)
        assert row.nnz == int(layer.mask.sum()) and row.numel == layer.weight.numel()
        assert row.density == pytest.approx(row.nnz / row.numel)
    fc3 = report.rows[-1]
    assert (fc3.kind, fc3.sparse, fc3.nnz, fc3.numel, fc3.density) == ("Linear", False, 840, 840, 1.0)
    numel = sum(modules[n].weight.numel() for n in names)
    assert report.total.nnz == round(0.1 * numel) + 840 and report.total.numel == numel + 840
    assert report.total_density == pytest.approx((round(0.1 * numel) + 840) / (numel + 840))
    text = str(report)
    for name in names + ["total", "SparseConv2d", "SparseLinear", "6x1x5x5", "fc3", "Linear (dense)"]:
        assert name in text
    lines = text.splitlines()
    assert len({len(line) for line in lines if not line.startswith("-")}) <= 2  # aligned columns
    assert report.to_dict()["total"]["nnz"] == report.total.nnz


def test_density_report_of_a_dense_model_is_all_dense_rows():
    model = make_net()
    report = density_report(model)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    assert len(report.rows) == len(weights) and not any(r.sparse for r in report.rows)
    assert report.total.numel == sum(p.numel() for p in weights) and report.total_density == 1.0
    empty = density_report(nn.Sequential(nn.ReLU()))
    assert empty.rows == () and empty.total.numel == 0 and empty.total_density == 0.0
    assert "no weights" in str(empty)


# ---------------------------------------------------------------- to_layout / sparsify(layout="csr")
def test_to_layout_round_trip_keeps_the_function_and_the_mask():
    layer = SparseLinear(40, 30, density=0.3, generator=seeded(2))
    x = torch.randn(6, 40, generator=seeded(3))
    csr = to_layout(layer, "csr")
    assert isinstance(csr, CsrLinear) and csr.layout == "csr" and layer.layout == "mask"
    assert to_layout(csr, "csr") is csr and to_layout(layer, "mask") is layer
    assert torch.equal(csr.mask, layer.mask)
    assert torch.equal(csr.active_values(), layer.weight.detach()[layer.mask])
    close(csr(x), layer(x))
    assert to_layout(layer, "csr", capacity=400).capacity == 400
    back = to_layout(csr, "mask")
    assert isinstance(back, SparseLinear) and back.layout == "mask" and csr.layout == "csr"
    assert torch.equal(back.mask, layer.mask)
    assert torch.equal(back.weight, layer.weight)
    assert sm.mask_of(back.weight) is back.mask
    close(back(x), layer(x))
    # The new layers are independent of the old one.
    with torch.no_grad():
        csr.values.mul_(2)
    assert torch.equal(back.weight, layer.weight)


def make_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5))


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_sparsify_csr_has_the_counts_and_masks_of_the_mask_layout(distribution):
    csr_model = sparsify(make_linears(), 0.1, distribution=distribution, layout="csr", generator=seeded(5))
    mask_model = sparsify(make_linears(), 0.1, distribution=distribution, layout="mask", generator=seeded(5))
    csr_report, mask_report = density_report(csr_model), density_report(mask_model)
    assert [(r.name, r.shape, r.nnz, r.numel) for r in csr_report.rows] == \
           [(r.name, r.shape, r.nnz, r.numel) for r in mask_report.rows]
    assert csr_report.total.nnz == round(0.1 * (30 * 40 + 40 * 20 + 20 * 5))
    for name in ("0", "2", "4"):
        c, m = csr_model.get_submodule(name), mask_model.get_submodule(name)
        assert isinstance(c, CsrLinear) and isinstance(m, SparseLinear)
        assert torch.equal(c.mask, m.mask)
        assert torch.equal(c.active_values(), m.weight.detach()[m.mask])
    x = torch.randn(4, 30)
    close(csr_model(x), mask_model(x))


def test_to_layout_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="layout"):
        to_layout(SparseLinear(4, 5, density=0.5), "dense")
    with pytest.raises(TypeError, match="SparseLinear, SparseConv2d, CsrLinear or CsrConv2d"):
        to_layout(nn.Linear(4, 5), "csr")
    with pytest.raises(ValueError, match="dilation must be 1"):
        to_layout(sm.SparseConv2d(2, 3, 3, dilation=2, density=0.5), "csr")


@pytest.mark.parametrize("widths", [(784, 300, 100, 10), (64,) + (256,) * 9 + (10,)], ids=["3-layers", "10-layers"])
def test_sparsify_csr_capacity_gives_small_layers_room_and_adds_at_most_the_models_nonzeros(widths):
    """Each layer gets 1.5x its nonzeros as slots, or its share of the model's nonzeros (a
    quarter; 1/L in a model of L > 4 layers), at most its size: LeNet-300-100's 100 x 300
    layer a quarter of the model, and a deep stack no more slots than 2.5x its nonzeros."""
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    sparsify(model, density=0.05, layout="csr", generator=seeded(0))
    layers = [m for m in model if isinstance(m, CsrLinear)]
    model_nnz, share = sum(m.nnz for m in layers), min(0.25, 1 / len(layers))
    for m in layers:
        numel = m.in_features * m.out_features
        assert m.capacity == min(numel, max(math.ceil(1.5 * m.nnz), math.ceil(share * model_nnz)))
    assert sum(m.capacity for m in layers) <= 2.5 * model_nnz
    if len(layers) == 3:
        assert layers[1].capacity == math.ceil(model_nnz / 4) > 1.5 * layers[1].nnz
