"""Gradient taps (sparsemom_ext.sparsity.taps): what a layer's backward passes hand the engine.

Each signal is checked against its pure-PyTorch meaning: the candidates' gradient against
the weight's own gradient (values.grad) at the same positions, the dense gradient against
it at the active positions, GraBo's factors against grabo_factors of the same batch.
"""

import pytest
import torch
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.sparsity.sampling import grabo_factors
from sparsemom_ext.sparsity.taps import GradientTap

from conftest import seeded


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled code is counted per code object (nn.Sequential.forward) against dynamo's
    # recompile limit across the whole process; each test starts from none.
    torch._dynamo.reset()


def csr_linear():
    return sm.CsrLinear(32, 16, density=0.3, generator=seeded(0)), torch.randn(4, 32, generator=seeded(1))


def csr_conv():
    return (sm.CsrConv2d(3, 8, 3, padding=1, density=0.3, generator=seeded(0)),
            torch.randn(2, 3, 5, 5, generator=seeded(1)))


def mask_linear():
    return sm.SparseLinear(32, 16, density=0.3, generator=seeded(0)), torch.randn(4, 32, generator=seeded(1))


def mask_conv():
    return (sm.SparseConv2d(3, 8, 3, stride=2, padding=1, density=0.3, generator=seeded(0)),
            torch.randn(2, 3, 6, 6, generator=seeded(1)))


def tap_of(layer):
    n_rows = layer.n_rows if hasattr(layer, "n_rows") else layer.weight.shape[0]
    n_cols = layer.n_cols if hasattr(layer, "n_cols") else layer.weight[0].numel()
    like = layer.values if hasattr(layer, "values") else layer.weight
    tap = layer.gradient_tap = GradientTap(layer, n_rows, n_cols, like)
    return tap


def grad_of_output(layer, x):
    """The output gradient of the loss the tests use, and GraBo's factors of that batch."""
    tap, layer.gradient_tap = layer.gradient_tap, None
    y = layer(x.clone())
    grad_out = torch.autograd.grad(torch.relu(y).square().sum(), y)[0]
    layer.gradient_tap = tap
    return grabo_factors(layer, x, grad_out)


@pytest.mark.parametrize("make", [csr_linear, csr_conv])
@pytest.mark.parametrize("compiled", [False, True])
def test_an_armed_tap_hands_over_the_candidates_gradient_the_dense_gradient_and_the_factors(make, compiled):
    layer, x = make()
    tap = tap_of(layer)
    tap.arm(layer.structure(), dense=True, grabo=True)
    model = nn.Sequential(layer, nn.ReLU(inplace=True))  # an in-place op on the tapped output is allowed
    forward = torch.compile(model, fullgraph=True) if compiled else model
    for _ in range(2):  # two backward passes: the signals are summed, as the weights' gradients are
        forward(x).square().sum().backward()
    got = tap.take()
    nnz = layer.nnz
    torch.testing.assert_close(got["at"], layer.values.grad[:nnz])
    torch.testing.assert_close(got["dense"].reshape(-1)[layer.active_flat()], layer.values.grad[:nnz])
    rows, cols = grad_of_output(layer, x)
    torch.testing.assert_close(got["factors"][0], 2 * rows)
    torch.testing.assert_close(got["factors"][1], 2 * cols)
    assert not tap.take(), "take() empties the leaves"


@pytest.mark.parametrize("make", [mask_linear, mask_conv])
def test_a_mask_layer_taps_grabo_factors(make):
    layer, x = make()
    tap = tap_of(layer)
    tap.arm(grabo=True)
    torch.relu(layer(x)).square().sum().backward()
    rows, cols = grad_of_output(layer, x)
    got = tap.take()
    assert set(got) == {"factors"}
    torch.testing.assert_close(got["factors"][0], rows)
    torch.testing.assert_close(got["factors"][1], cols)


def test_an_unarmed_tap_or_an_evaluation_batch_leaves_the_output_untouched():
    layer, x = csr_linear()
    tap = tap_of(layer)
    y = layer(x)
    assert y.grad_fn.name() != "_TapBackward"
    tap.arm(grabo=True)
    assert layer(x).grad_fn.name() == "_TapBackward"
    with torch.no_grad():
        layer(x)
    assert not tap.take()
    tap.arm()  # disarmed: nothing is delivered any more
    layer(x).sum().backward()
    assert not tap.take()


def test_rearming_with_the_same_request_keeps_the_leaves():
    # A compiled graph takes the leaves as inputs: new ones of the same shape would not
    # recompile, but keeping them keeps arming free.
    layer, _ = csr_linear()
    tap = tap_of(layer)
    structure = layer.structure()
    tap.arm(structure, dense=True, grabo=True)
    leaves = (tap.at, tap.dense, tap.rows, tap.cols)
    tap.arm(structure, dense=True, grabo=True)
    assert (tap.at, tap.dense, tap.rows, tap.cols) == leaves
    tap.arm((structure[0].clone(), structure[1].clone()))
    assert tap.at is not leaves[0] and tap.dense is None and tap.rows is None


def test_under_autocast_the_signals_keep_the_layers_dtype():
    layer, x = csr_linear()
    tap = tap_of(layer)
    tap.arm(layer.structure(), grabo=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().square().sum()
    loss.backward()
    got = tap.take()
    assert got["at"].dtype == got["factors"][0].dtype == torch.float32
    torch.testing.assert_close(got["at"], layer.values.grad[: layer.nnz], rtol=2e-2, atol=2e-2)
