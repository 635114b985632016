"""SparseLinear(layout="csr") against F.linear with its dense weight; to_layout(), sparsify()
and the state_dict of the csr layout; the sparse/dense/auto backends of the mask layout."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsemom_ext as sm
from sparsemom_ext.nn import SparseLinear, density_report, sparsify

from conftest import DEVICES


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


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


# ---------------------------------------------------------------- the csr layer
@pytest.mark.parametrize("x_shape", [(8, 40), (2, 3, 40), (40,)])
def test_csr_layer_computes_f_linear_with_its_dense_weight(x_shape):
    layer = SparseLinear(40, 30, density=0.3, layout="csr", generator=seeded())
    assert layer.layout == "csr" and layer.uses_sparse_kernels(torch.zeros(1, 40))
    x = torch.randn(x_shape, generator=seeded(1))
    weight_grad = check_against_dense(layer, x)
    # The values' gradient is the dense weight's gradient at the active positions.
    close(layer.values.grad, weight_grad[layer.mask])


def test_csr_layer_mask_density_nnz_and_no_weight():
    layer = SparseLinear(40, 30, density=0.3, layout="csr", generator=seeded())
    assert set(dict(layer.named_parameters())) == {"values", "bias"}
    assert layer.nnz == 360 == layer.values.numel() and layer.density == pytest.approx(0.3)
    mask = layer.mask
    assert mask.dtype == torch.bool and mask.shape == (30, 40) and int(mask.sum()) == 360
    assert (layer.values != 0).all()
    assert torch.equal(mask, layer.dense_weight() != 0)
    assert torch.equal(layer.dense_weight()[mask], layer.values.detach())  # row-major = CSR order
    assert not layer.dense_weight().requires_grad
    with pytest.raises(AttributeError, match="values"):
        layer.weight
    assert "layout=csr" in repr(layer) and "density=0.3" in repr(layer)


def test_csr_layer_same_seed_same_mask_as_mask_layer():
    csr = SparseLinear(40, 30, density=0.3, layout="csr", generator=seeded(4))
    mask = SparseLinear(40, 30, density=0.3, generator=seeded(4))
    assert torch.equal(csr.mask, mask.mask)


def test_dense_csr_layer_is_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(20, 30)
    torch.manual_seed(0)
    layer = SparseLinear(20, 30, layout="csr")
    assert layer.nnz == 600 and layer.density == 1.0 and layer.mask.all()
    assert torch.equal(layer.values, ref.weight.detach().reshape(-1))
    assert torch.equal(layer.bias, ref.bias)
    x = torch.randn(5, 20)
    close(layer(x), ref(x))


def test_csr_layer_with_no_weights_outputs_the_bias():
    layer = SparseLinear(10, 10, density=0.004, layout="csr")  # 0.4 weights rounds to 0
    assert layer.nnz == 0 and layer.density == 0.0 and not layer.mask.any()
    x = torch.randn(3, 10, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, layer.bias.detach().expand(3, 10))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 10))
    assert layer.values.grad.shape == (0,)
    assert torch.equal(layer.bias.grad, torch.full((10,), 3.0))


def test_csr_layer_empty_batch():
    layer = SparseLinear(12, 7, density=0.5, layout="csr", generator=seeded())
    x = torch.zeros(0, 12, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert not layer.values.grad.any() and not layer.bias.grad.any()


@pytest.mark.parametrize("kwargs", [dict(layout="csr"), dict(backend="sparse")], ids=["csr", "mask-sparse"])
def test_sparse_kernel_paths_reject_bad_input(kwargs):
    layer = SparseLinear(12, 7, density=0.5, generator=seeded(), **kwargs)
    with pytest.raises(ValueError, match="in_features=12"):
        layer(torch.randn(4, 11))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 12, dtype=torch.float64))


# ---------------------------------------------------------------- to_layout / sparsify
def test_to_layout_round_trip_keeps_the_function_and_the_mask():
    layer = SparseLinear(40, 30, density=0.3, generator=seeded(2))
    x = torch.randn(6, 40, generator=seeded(3))
    csr = layer.to_layout("csr")
    assert csr is not layer and csr.layout == "csr" and layer.layout == "mask"
    assert csr.to_layout("csr") is csr and layer.to_layout("mask") is layer
    assert torch.equal(csr.mask, layer.mask)
    assert torch.equal(csr.values.detach(), layer.weight.detach()[layer.mask])
    close(csr(x), layer(x))
    back = csr.to_layout("mask")
    assert back is not csr and back.layout == "mask" and csr.layout == "csr"
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
        assert c.layout == "csr" and m.layout == "mask"
        assert torch.equal(c.mask, m.mask)
        assert torch.equal(c.values.detach(), m.weight.detach()[m.mask])
    x = torch.randn(4, 30)
    close(csr_model(x), mask_model(x))


# ---------------------------------------------------------------- state_dict
def test_csr_state_dict_round_trip_into_a_layer_of_another_nnz():
    src = SparseLinear(20, 30, density=0.3, layout="csr", generator=seeded(1))
    dst = SparseLinear(20, 30, density=0.1, layout="csr", generator=seeded(2))
    state = src.state_dict()
    assert set(state) == {"values", "bias", "row_ptr", "col_idx"}
    values = dst.values
    dst.load_state_dict(state)
    assert dst.values is values and values.numel() == src.nnz == 180
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
                                     "row_ptr_not_monotone", "values_length", "col_idx_repeated"])
def test_loading_a_malformed_structure_fails_and_changes_nothing(corrupt):
    src = SparseLinear(20, 30, density=0.3, layout="csr", generator=seeded(1))
    dst = SparseLinear(20, 30, density=0.1, layout="csr", generator=seeded(2))
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
    layer = SparseLinear(20, 30, density=0.3, layout="csr", generator=seeded(1))
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
    layer = SparseLinear(20, 30, density=0.3, layout="csr", generator=seeded(1))
    x = torch.randn(5, 20)
    y = layer(x)
    layer.cuda()
    for name in ("values", "row_ptr", "col_idx", "col_ptr", "row_idx", "perm"):
        assert getattr(layer, name).is_cuda, name
    xc = x.cuda().requires_grad_()
    close(layer(xc).cpu(), y)
    layer(xc).sum().backward()
    assert xc.grad.is_cuda


# ---------------------------------------------------------------- mask layout backends
def test_mask_layout_sparse_and_dense_backends_agree():
    sparse = SparseLinear(64, 48, density=0.2, backend="sparse", generator=seeded(3))
    dense = copy.deepcopy(sparse)
    dense.backend = "dense"
    x = torch.randn(2, 9, 64, generator=seeded(4))
    assert sparse.uses_sparse_kernels(x) and not dense.uses_sparse_kernels(x)
    grads = []
    for layer in (sparse, dense):
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(torch.randn(y.shape, generator=seeded(5)))
        grads.append((y, xr.grad, layer.weight.grad, layer.bias.grad))
    for name, a, b in zip(("y", "x.grad", "weight.grad", "bias.grad"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # The weight gradient is dense, inactive positions included (sparse momentum grows from it).
    assert grads[0][2].shape == (48, 64) and grads[0][2][~sparse.mask].abs().sum() > 0


def test_sparse_backend_rebuilds_its_structure_when_the_mask_changes():
    layer = SparseLinear(64, 48, density=0.2, backend="sparse", generator=seeded(3))
    x = torch.randn(10, 64, generator=seeded(4))
    check_against_dense(layer, x, layer.weight)  # builds and caches the structure
    with torch.no_grad():
        layer.mask[0, :] = False  # in place, as the engine does
        layer.weight[0, :] = 0
        grown = (~layer.mask[1]).nonzero()[:3, 0]
        layer.mask[1, grown] = True
        layer.weight[1, grown] = torch.tensor([1.5, -2.0, 3.0])
    y = layer(x)
    assert (y[:, 0] == layer.bias[0]).all()
    check_against_dense(layer, x, layer.weight)
    # A stale structure would miss the grown weights.
    close(y, F.linear(x, layer.weight, layer.bias))


def test_sparse_backend_follows_a_replaced_mask_buffer():
    # Replacing the buffer (not in place) twice between forwards used to be able to hit
    # the cache of the first mask: a new mask at its freed address, with an equal version.
    layer = SparseLinear(64, 48, density=0.2, backend="sparse", generator=seeded(3))
    x = torch.randn(4, 64, generator=seeded(4))
    g = seeded(5)
    for _ in range(10):
        layer(x)
        for _ in range(2):
            mask = torch.rand(48, 64, generator=g) < 0.2
            with torch.no_grad():
                layer.weight.copy_(torch.randn(48, 64, generator=g) * mask)
            layer.mask = mask
        close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_auto_backend_picks_sparse_for_large_sparse_float32_cpu_layers():
    x = torch.randn(3, 512)
    sparse = SparseLinear(512, 512, density=0.1, generator=seeded())
    assert sparse.backend == "auto" and sparse.uses_sparse_kernels(x)
    check_against_dense(sparse, x, sparse.weight)
    assert not SparseLinear(512, 512, density=0.5, generator=seeded()).uses_sparse_kernels(x)
    float64 = SparseLinear(512, 512, density=0.1, dtype=torch.float64, generator=seeded())
    assert not float64.uses_sparse_kernels(x.double())
    assert not SparseLinear(64, 64, density=0.1, generator=seeded()).uses_sparse_kernels(torch.randn(3, 64))


def test_invalid_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        SparseLinear(4, 5, density=0.5, backend="fast")

