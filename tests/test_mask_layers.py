"""SparseLinear / SparseConv2d (the mask layout) against nn.Linear / nn.Conv2d, and the sparse /
dense / auto backends of SparseLinear."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsemom_ext as sm
from sparsemom_ext.nn import SparseConv2d, SparseLinear

from conftest import DEVICES, check_against_dense, close


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
def test_bad_generator_and_no_layout_argument(cls, args):
    with pytest.raises(TypeError, match="layout"):  # the csr layout is CsrLinear, a class of its own
        cls(*args, density=0.5, layout="csr")
    with pytest.raises(TypeError, match="generator"):
        cls(*args, density=0.5, generator=1234)


def test_extra_repr_and_dense_weight():
    layer = SparseLinear(20, 30, density=0.25, generator=seeded())
    text = repr(layer)
    assert "density=0.25" in text and "in_features=20" in text
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
    weight_grad = check_against_dense(layer, x, layer.weight)  # builds and caches the structure
    close(layer.weight.grad, weight_grad)
    with torch.no_grad():
        layer.mask[0, :] = False  # in place, as the engine does
        layer.weight[0, :] = 0
        grown = (~layer.mask[1]).nonzero()[:3, 0]
        layer.mask[1, grown] = True
        layer.weight[1, grown] = torch.tensor([1.5, -2.0, 3.0])
    y = layer(x)
    assert (y[:, 0] == layer.bias[0]).all()
    weight_grad = check_against_dense(layer, x, layer.weight)
    close(layer.weight.grad, weight_grad)
    # A stale structure would miss the grown weights.
    close(y, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("writer", ["data", "numpy", "dlpack"])
def test_sparse_backend_sees_mask_writes_its_version_counter_misses(writer):
    # A user prunes row 0 and grows three weights in row 1 by writing through an alias the
    # mask's version counter does not see; the sparse backend must compute with that mask.
    layer = SparseLinear(64, 48, density=0.2, backend="sparse", generator=seeded(3))
    x = torch.randn(10, 64, generator=seeded(4))
    layer(x)  # builds and caches the structure
    version = layer.mask._version
    alias = {"data": lambda m: m.data, "numpy": lambda m: torch.from_numpy(m.numpy()),
             "dlpack": lambda m: torch.from_dlpack(m.__dlpack__())}[writer](layer.mask)
    grown = (~layer.mask[1]).nonzero()[:3, 0]
    alias[0, :] = False
    alias[1, grown] = True
    with torch.no_grad():
        layer.weight[0, :] = 0
        layer.weight[1, grown] = torch.tensor([1.5, -2.0, 3.0])
    assert layer.mask._version == version and layer.mask[1, grown].all()
    y = layer(x)
    close(y, F.linear(x, layer.weight, layer.bias))  # a stale structure misses the grown weights
    assert (y[:, 0] == layer.bias[0]).all()
    weight_grad = check_against_dense(layer, x, layer.weight)
    close(layer.weight.grad, weight_grad)


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
    weight_grad = check_against_dense(sparse, x, sparse.weight)
    close(sparse.weight.grad, weight_grad)
    assert not SparseLinear(512, 512, density=0.5, generator=seeded()).uses_sparse_kernels(x)
    float64 = SparseLinear(512, 512, density=0.1, dtype=torch.float64, generator=seeded())
    assert not float64.uses_sparse_kernels(x.double())
    assert not SparseLinear(64, 64, density=0.1, generator=seeded()).uses_sparse_kernels(torch.randn(3, 64))


def test_invalid_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        SparseLinear(4, 5, density=0.5, backend="fast")

