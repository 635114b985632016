"""The way out to plain torch: sm.densify(model) and sm.nn.sparse_csr_weight(layer), as a user runs them."""

import copy
import warnings

import pytest
import torch
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.nn import sparse_csr_weight


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


def mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


def encoder():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3))


def train(model, x, y, steps=6):
    """A user's training loop: fused SGD, the engine updating every 2 steps."""
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(model, optimizer, prune_rate=0.3, update_every=2, total_steps=steps)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        engine.step()
    assert engine.updates >= 2
    return model


CASES = {
    "mlp-mask": (mlp, "mask", lambda: torch.randn(16, 20, generator=seeded(1)), 5),
    "mlp-csr": (mlp, "csr", lambda: torch.randn(16, 20, generator=seeded(1)), 5),
    "conv-mask": (ConvNet, "mask", lambda: torch.randn(8, 1, 8, 8, generator=seeded(1)), 10),
    "encoder-mask": (encoder, "mask", lambda: torch.randn(4, 6, 16, generator=seeded(1)), 3),
    "encoder-csr": (encoder, "csr", lambda: torch.randn(4, 6, 16, generator=seeded(1)), 3),
}


def logits(model, x):
    out = model(x)
    return out.mean(dim=1) if out.dim() == 3 else out  # the encoder's per-token outputs, pooled


@pytest.mark.parametrize("case", list(CASES))
def test_densified_model_loads_strictly_into_the_original_architecture(case):
    build, layout, make_x, classes = CASES[case]
    torch.manual_seed(0)
    original = build()
    sparse = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # csr: attention's weights go to the mask layout, with a warning
        sparse = sm.sparsify(sparse, density=0.2, layout=layout, generator=seeded(2))
    x = make_x()
    y = torch.randint(0, classes, (x.shape[0],), generator=seeded(3))

    class Pooled(nn.Module):  # the encoder's token outputs, averaged into one prediction
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return logits(self.inner, x)

    train(Pooled(sparse), x, y)
    sparse.eval()
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    reference = sparse(x)

    dense = sm.densify(sparse)

    # The sparse model is left exactly as it was.
    assert sparse.state_dict().keys() == before.keys()
    for key, value in sparse.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(sparse(x), reference)
    # A plain torch model: no sparse class, no mask anywhere.
    sparse_types = (sm.SparseLinear, sm.SparseConv2d, sm.CsrLinear, sm.SparseMultiheadAttention)
    assert not any(isinstance(m, sparse_types) for m in dense.modules())
    assert all(sm.mask_of(p) is None for p in dense.parameters())
    assert [type(m) for m in dense.modules()] == [type(m) for m in original.modules()]
    assert not dense.training
    # Its state_dict is the original architecture's, and computes what the sparse model computes.
    original.load_state_dict(dense.state_dict(), strict=True)
    original.eval()
    torch.testing.assert_close(dense(x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(original(x), reference, rtol=1e-5, atol=1e-5)
    # The zeros are in place: the dense weights have the sparse model's density.
    report = sm.density_report(sparse)
    zeros = sum(int((p == 0).sum()) for p in dense.parameters() if p.dim() >= 2)
    assert zeros >= report.total.numel - report.total.nnz


def test_densified_encoder_takes_torchs_fast_path_again():
    torch.manual_seed(0)
    original = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
    with pytest.warns(UserWarning, match="out_proj"):
        sparse = sm.sparsify(copy.deepcopy(original), 0.3, layout="csr", generator=seeded())
    dense = sm.densify(sparse)
    for name in ("activation_relu_or_gelu",):
        assert getattr(dense.layers[0], name) == getattr(original.layers[0], name)
    assert dense.use_nested_tensor == original.use_nested_tensor
    dense.eval()
    x = torch.randn(2, 5, 16, generator=seeded(1))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(x, src_key_padding_mask=pad)[0], sparse(x, src_key_padding_mask=pad)[0],
                                   rtol=1e-5, atol=1e-5)


def test_densify_of_a_single_layer_and_of_attached_masks():
    layer = sm.CsrLinear(12, 7, density=0.3, generator=seeded())
    dense = sm.densify(layer)
    assert type(dense) is nn.Linear and torch.equal(dense.weight, layer.dense_weight())
    x = torch.randn(3, 12, generator=seeded(1))
    torch.testing.assert_close(dense(x), layer(x))

    # A parameter the user gave a mask by hand comes out zero off it, without the mask.
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    mask = torch.rand(10, 4, generator=seeded(2)) < 0.5
    sm.attach_mask(model[0].weight, mask)
    out = sm.densify(model)
    assert sm.mask_of(model[0].weight) is mask
    assert sm.mask_of(out[0].weight) is None
    assert torch.equal(out[0].weight.detach(), model[0].weight.detach().masked_fill(~mask, 0))


def test_densify_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sm.densify({"weight": torch.zeros(2)})


@pytest.mark.parametrize("make_layer", [
    lambda: sm.CsrLinear(30, 12, density=0.2, generator=seeded()),
    lambda: sm.SparseLinear(30, 12, density=0.2, generator=seeded()),
], ids=["csr", "mask"])
def test_sparse_csr_weight_is_torchs_csr_tensor_of_the_layer(make_layer):
    layer = make_layer()
    weight_csr = sparse_csr_weight(layer)
    assert weight_csr.layout == torch.sparse_csr and weight_csr.shape == (12, 30)
    assert weight_csr._nnz() == layer.nnz
    assert torch.equal(weight_csr.to_dense(), layer.dense_weight())
    x = torch.randn(5, 30, generator=seeded(1))
    with torch.no_grad():
        torch.testing.assert_close((weight_csr @ x.T).T + layer.bias, layer(x), rtol=1e-5, atol=1e-5)


def test_sparse_csr_weight_of_a_conv_is_its_unfolded_matrix():
    conv = sm.SparseConv2d(3, 6, 3, padding=1, density=0.3, generator=seeded())
    weight_csr = sparse_csr_weight(conv)
    assert weight_csr.shape == (6, 27)
    x = torch.randn(2, 3, 5, 5, generator=seeded(1))
    columns = nn.functional.unfold(x, 3, padding=1)  # (2, 27, 25)
    out = torch.stack([weight_csr @ c for c in columns]).reshape(2, 6, 5, 5) + conv.bias.view(1, 6, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)


def test_sparse_csr_weight_names_what_it_takes():
    with pytest.raises(TypeError, match="layer must be a CsrLinear, CsrConv2d, SparseLinear or SparseConv2d, got Linear"):
        sparse_csr_weight(nn.Linear(3, 3))
