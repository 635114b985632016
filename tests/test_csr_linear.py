"""CsrLinear (the csr layout) against F.linear with its dense weight; its fixed-capacity
storage across topology changes; its state_dict, copies and devices."""

import copy

import pytest
import torch
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.csr_structure import relayout_plan
from sparsemom_ext.nn import CsrLinear, SparseLinear

from conftest import DEVICES, check_against_dense, close


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the csr layer
@pytest.mark.parametrize("x_shape", [(8, 40), (2, 3, 40), (40,)])
def test_csr_layer_computes_f_linear_with_its_dense_weight(x_shape):
    layer = CsrLinear(40, 30, density=0.3, generator=seeded())
    assert layer.layout == "csr" and not isinstance(layer, nn.Linear)
    x = torch.randn(x_shape, generator=seeded(1))
    weight_grad = check_against_dense(layer, x)
    # The values' gradient is the dense weight's gradient at the active positions, 0 in the idle slots.
    close(layer.values.grad[: layer.nnz], weight_grad[layer.mask])
    assert not layer.values.grad[layer.nnz:].any()


def test_csr_layer_mask_density_nnz_capacity_and_no_weight():
    layer = CsrLinear(40, 30, density=0.3, generator=seeded())
    assert set(dict(layer.named_parameters())) == {"values", "bias"}
    assert layer.nnz == 360 and layer.density == pytest.approx(0.3)
    assert layer.capacity == 540 == layer.values.numel() == layer.col_idx.numel()  # default: 1.5x the nnz
    mask = layer.mask
    assert mask.dtype == torch.bool and mask.shape == (30, 40) and int(mask.sum()) == 360
    assert (layer.active_values() != 0).all() and not layer.values[360:].any()
    assert torch.equal(mask, layer.dense_weight() != 0)
    assert torch.equal(layer.dense_weight()[mask], layer.active_values())  # row-major = CSR order
    assert not layer.dense_weight().requires_grad
    assert not hasattr(layer, "weight")
    assert "capacity=540" in repr(layer) and "density=0.3" in repr(layer)
    assert CsrLinear(40, 30, density=0.9).capacity == 1200  # at most in x out
    assert CsrLinear(40, 30, density=0.3, capacity=400).capacity == 400


def test_csr_layer_same_seed_same_mask_as_mask_layer():
    torch.manual_seed(7)
    csr = CsrLinear(40, 30, density=0.3, generator=seeded(4))
    torch.manual_seed(7)
    mask = SparseLinear(40, 30, density=0.3, generator=seeded(4))
    assert torch.equal(csr.mask, mask.mask)
    assert torch.equal(csr.dense_weight(), mask.weight.detach())


def test_dense_csr_layer_is_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(20, 30)
    torch.manual_seed(0)
    layer = CsrLinear(20, 30)
    assert layer.nnz == 600 == layer.capacity and layer.density == 1.0 and layer.mask.all()
    assert torch.equal(layer.values, ref.weight.detach().reshape(-1))
    assert torch.equal(layer.bias, ref.bias)
    x = torch.randn(5, 20)
    close(layer(x), ref(x))


def test_csr_layer_with_no_weights_outputs_the_bias():
    layer = CsrLinear(10, 10, density=0.004)  # 0.4 weights rounds to 0
    assert layer.nnz == 0 and layer.density == 0.0 and not layer.mask.any()
    x = torch.randn(3, 10, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, layer.bias.detach().expand(3, 10))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 10))
    assert layer.values.grad.shape == (0,)
    assert torch.equal(layer.bias.grad, torch.full((10,), 3.0))


def test_csr_layer_empty_batch():
    layer = CsrLinear(12, 7, density=0.5, generator=seeded())
    x = torch.zeros(0, 12, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert not layer.values.grad.any() and not layer.bias.grad.any()


@pytest.mark.parametrize("make", [lambda: CsrLinear(12, 7, density=0.5, generator=seeded()),
                                  lambda: SparseLinear(12, 7, density=0.5, generator=seeded(), backend="sparse")],
                         ids=["csr", "mask-sparse"])
def test_sparse_kernel_paths_reject_bad_input(make):
    layer = make()
    with pytest.raises(ValueError, match="in_features=12"):
        layer(torch.randn(4, 11))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 12, dtype=torch.float64))


# ---------------------------------------------------------------- state_dict
def test_csr_state_dict_round_trip_into_a_layer_of_another_nnz():
    src = CsrLinear(20, 30, density=0.3, generator=seeded(1))
    dst = CsrLinear(20, 30, density=0.1, generator=seeded(2))
    state = src.state_dict()
    assert set(state) == {"values", "bias", "row_ptr", "col_idx"}
    values = dst.values
    dst.load_state_dict(state)  # another capacity: the tensors take the checkpoint's
    assert dst.values is values and dst.nnz == src.nnz == 180 and dst.capacity == src.capacity == 270
    for name in ("values", "bias", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert torch.equal(getattr(dst, name), getattr(src, name)), name
    assert torch.equal(dst.mask, src.mask)
    x = torch.randn(5, 20, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = src(x), dst(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)  # the cached transpose is the new structure's
    assert torch.equal(dst.values.grad, src.values.grad)


@pytest.mark.parametrize("corrupt", ["col_idx_too_large", "col_idx_negative", "row_ptr_length",
                                     "row_ptr_not_monotone", "values_length", "col_idx_repeated",
                                     "row_ptr_past_capacity"])
def test_loading_a_malformed_structure_fails_and_changes_nothing(corrupt):
    src = CsrLinear(20, 30, density=0.3, generator=seeded(1))
    dst = CsrLinear(20, 30, density=0.1, generator=seeded(2))
    state = {k: v.clone() for k, v in src.state_dict().items()}
    if corrupt == "col_idx_too_large":
        state["col_idx"][3] = 20
    elif corrupt == "col_idx_negative":
        state["col_idx"][3] = -1
    elif corrupt == "row_ptr_length":
        state["row_ptr"] = state["row_ptr"][:-1]
    elif corrupt == "row_ptr_not_monotone":
        state["row_ptr"][5] = int(state["row_ptr"][6]) + 1  # row 5 has a negative count
    elif corrupt == "values_length":
        state["values"] = state["values"][:-1]
    elif corrupt == "row_ptr_past_capacity":
        state["row_ptr"][-1] = state["col_idx"].numel() + 1
    elif corrupt == "col_idx_repeated":  # valid for the ops, not canonical for a layer
        row = int(torch.nonzero(state["row_ptr"].diff() >= 2)[0])
        first = int(state["row_ptr"][row])
        state["col_idx"][first + 1] = state["col_idx"][first]
    names = ("values", "bias", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm")
    before = {name: getattr(dst, name).clone() for name in names}
    x = torch.randn(4, 20)
    y_before = dst(x)
    with pytest.raises(RuntimeError, match="invalid CSR structure") as info:
        dst.load_state_dict(state)
    word = "values" if corrupt == "values_length" else corrupt.split("_")[0] + "_" + corrupt.split("_")[1]
    assert word in str(info.value)
    for name in names:
        assert torch.equal(getattr(dst, name), before[name]), name
    assert torch.equal(dst(x), y_before)


def test_csr_layer_to_float64_and_deepcopy():
    layer = CsrLinear(20, 30, density=0.3, generator=seeded(1))
    x = torch.randn(5, 20, generator=seeded(2))
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), y)
    for name in ("values", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert getattr(twin, name).data_ptr() != getattr(layer, name).data_ptr(), name
    check_against_dense(twin, x)
    layer.to(torch.float64)
    assert layer.values.dtype == layer.bias.dtype == torch.float64
    for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert getattr(layer, name).dtype == torch.int32, name
    close(layer(x.double()), y.double())
    check_against_dense(layer, x.double())


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_csr_layer_moves_to_cuda_with_its_cached_transpose():
    layer = CsrLinear(20, 30, density=0.3, generator=seeded(1))
    x = torch.randn(5, 20)
    y = layer(x)
    layer.cuda()
    for name in ("values", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert getattr(layer, name).is_cuda, name
    xc = x.cuda().requires_grad_()
    close(layer(xc).cpu(), y)
    layer(xc).sum().backward()
    assert xc.grad.is_cuda


# ---------------------------------------------------------------- topology changes
def new_topology(layer, keep_every=2, grow=None, seed=0):
    """A relayout of ``layer`` that keeps every ``keep_every``-th nonzero and grows
    ``grow`` inactive positions (default: enough to reach 1.5x the nnz)."""
    flat = layer.active_flat()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[::keep_every] = True
    inactive = (~layer.mask).reshape(-1).nonzero().reshape(-1)
    grow = (layer.nnz * 3 // 2 - int(keep.sum())) if grow is None else grow
    grown = inactive[torch.randperm(inactive.numel(), generator=seeded(seed))[:grow]].sort().values
    return relayout_plan(flat, keep, grown), flat, keep, grown


def test_set_topology_changes_no_shape_and_no_tensor():
    layer = CsrLinear(20, 30, density=0.3, generator=seeded(1))
    layer(torch.randn(4, 20)).sum().backward()
    before = layer.dense_weight()
    tensors = {name: getattr(layer, name) for name in ("values", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm")}
    shapes = {name: t.shape for name, t in tensors.items()}
    grad = layer.values.grad.clone()
    momentum = torch.randn(layer.capacity, generator=seeded(2))
    momentum[layer.nnz:] = 0
    old_momentum = momentum.clone()
    plan, flat, keep, grown = new_topology(layer)
    fill = torch.arange(1.0, grown.numel() + 1)
    layer.set_topology(plan, [(momentum, fill)])
    assert layer.nnz == plan.nnz == int(keep.sum()) + grown.numel() > 180
    for name, t in tensors.items():
        assert getattr(layer, name) is t and t.shape == shapes[name], name
    after = layer.dense_weight().reshape(-1)
    kept = flat[keep]
    assert torch.equal(after[kept], before.reshape(-1)[kept])  # kept weights keep their value
    assert not after[grown].any() and int((after != 0).sum()) == kept.numel()  # grown start at 0
    new_flat = layer.active_flat()
    assert torch.equal(new_flat, plan.flat)
    slot_of = {int(f): i for i, f in enumerate(new_flat)}
    for i, f in enumerate(flat[keep]):  # state and gradient move with their weight
        old_slot = int(keep.nonzero()[i])
        assert momentum[slot_of[int(f)]] == old_momentum[old_slot]
        assert layer.values.grad[slot_of[int(f)]] == grad[old_slot]
    for i, f in enumerate(grown):
        assert momentum[slot_of[int(f)]] == fill[i] and layer.values.grad[slot_of[int(f)]] == 0
    assert not momentum[layer.nnz:].any() and not layer.values[layer.nnz:].any()
    check_against_dense(layer, torch.randn(6, 20, generator=seeded(3)))  # structure and transpose agree


def test_set_topology_checks_everything_before_writing():
    layer = CsrLinear(20, 30, density=0.3, capacity=200, generator=seeded(1))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    too_many, _, _, _ = new_topology(layer, keep_every=1, grow=21)
    with pytest.raises(ValueError, match="capacity 200"):
        layer.set_topology(too_many)
    plan, _, _, _ = new_topology(layer, grow=10)
    with pytest.raises(ValueError, match="one entry per value slot"):
        layer.set_topology(plan, [(torch.zeros(180), None)])
    with pytest.raises(ValueError, match="one entry per grown position"):
        layer.set_topology(plan, [(torch.zeros(200), torch.zeros(1))])
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("capacity", [179, 601, 1.5, True])
def test_bad_capacity_names_the_argument(capacity):
    with pytest.raises(ValueError, match="capacity"):
        CsrLinear(20, 30, density=0.3, capacity=capacity)


def test_a_graph_alive_across_a_size_changing_topology_change():
    # The loop users write keeps `loss` (and its graph) until the next one replaces it.
    layer = CsrLinear(20, 30, density=0.3, generator=seeded(1))
    x = torch.randn(4, 20, generator=seeded(2))
    loss = layer(x).square().sum()
    loss.backward()
    plan, _, _, _ = new_topology(layer)
    layer.set_topology(plan)
    layer.values.grad = None
    loss = layer(x).square().sum()  # the old graph is still alive while this one is built
    loss.backward()
    weight = layer.dense_weight().requires_grad_()
    torch.nn.functional.linear(x, weight, layer.bias.detach()).square().sum().backward()
    close(layer.values.grad[: layer.nnz], weight.grad[layer.mask])


def test_csr_gradients_equal_the_masked_dense_layer():
    mask_layer = SparseLinear(30, 20, density=0.2, generator=seeded(), dtype=torch.float64)
    csr_layer = sm.nn.to_layout(mask_layer, "csr")
    x = torch.randn(7, 30, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, mask_layer.weight * mask_layer.mask, mask_layer.bias).sin().sum().backward()
    csr_layer(x2).sin().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(csr_layer.values.grad[: csr_layer.nnz], mask_layer.weight.grad[mask_layer.mask])
    torch.testing.assert_close(csr_layer.bias.grad, mask_layer.bias.grad)
