"""torch's attention and transformer classes, sparsified and trained as a user does, in both layouts."""

import copy
import pickle

import pytest
import torch
from torch import nn

import sparsemom_ext as sm


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def encoder(layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers)


def sparsify(model, layout, **kwargs):
    if layout == "csr" and any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        with pytest.warns(UserWarning, match=r"self_attn\.out_proj.*in_proj_weight.*mask layout"):
            return sm.sparsify(model, 0.2, layout=layout, generator=seeded(1), **kwargs)
    return sm.sparsify(model, 0.2, layout=layout, generator=seeded(1), **kwargs)


def train(model, steps=6, growth="momentum", x=None):
    """A few steps of a user's loop; returns the engine (two topology updates done)."""
    x = torch.randn(3, 5, 16, generator=seeded(2)) if x is None else x
    target = torch.randn(3, 5, 16, generator=seeded(3))
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(model, optimizer, prune_rate=0.3, update_every=3, total_steps=20, growth=growth)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        engine.step()
    assert engine.updates == 2
    return engine


def check_masked_weights_are_sparse(model):
    for module in model.modules():
        if isinstance(module, sm.SparseMultiheadAttention):
            for name, weight, mask in module.masked_weights():
                assert sm.mask_of(weight) is mask, name
                assert not weight.detach()[~mask].any(), name


@pytest.mark.parametrize("layout", ["mask", "csr"])
def test_transformer_encoder_trains_and_evaluates_in_both_layouts(layout):
    model = sparsify(encoder(), layout)
    layer = model.layers[0]
    assert isinstance(layer.self_attn, sm.SparseMultiheadAttention)
    assert isinstance(layer.self_attn.out_proj, sm.SparseLinear)  # attention reads out_proj.weight
    assert isinstance(layer.linear1, sm.CsrLinear if layout == "csr" else sm.SparseLinear)
    in_proj_mask = layer.self_attn.in_proj_weight_mask.clone()
    nnz = sm.density_report(model).total.nnz
    train(model)
    check_masked_weights_are_sparse(model)
    # The engine moved the attention's input projection too, and kept the model's count.
    assert not torch.equal(layer.self_attn.in_proj_weight_mask, in_proj_mask)
    assert sm.density_report(model).total.nnz == nnz

    model.eval()
    x = torch.randn(2, 5, 16, generator=seeded(4))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():  # where torch's fused fast paths run
        fast = model(x)
        padded = model(x, src_key_padding_mask=pad)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            slow = model(x)
            slow_padded = model(x, src_key_padding_mask=pad)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # The nested-tensor path pads with zeros where the slow path computes the padded tokens.
    torch.testing.assert_close(padded[0], slow_padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, :3], slow_padded[1, :3], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(model(x)).all()  # eval with grad enabled: the modules' forwards


def test_both_layouts_compute_the_same_encoder():
    mask_model, csr_model = sparsify(encoder(), "mask"), sparsify(encoder(), "csr")
    x = torch.randn(2, 5, 16, generator=seeded(4))
    for mode in ("train", "eval"):
        getattr(mask_model, mode)()
        getattr(csr_model, mode)()
        with torch.no_grad():
            torch.testing.assert_close(csr_model(x), mask_model(x), rtol=1e-5, atol=1e-5)


def test_encoder_layer_with_attention_excluded_evaluates_after_csr_sparsify():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    layer = sm.sparsify(layer, 0.2, layout="csr", exclude=nn.MultiheadAttention, generator=seeded(1))
    assert isinstance(layer.linear1, sm.CsrLinear) and type(layer.self_attn) is nn.MultiheadAttention
    x = torch.randn(2, 5, 16, generator=seeded(2))
    train_out = layer(x)
    layer.eval()  # dropout 0: eval computes what train computes
    with torch.no_grad():
        torch.testing.assert_close(layer(x), train_out.detach(), rtol=1e-5, atol=1e-5)
    report = sm.density_report(layer)
    dense_rows = [r.name for r in report.rows if not r.sparse]
    assert dense_rows == ["self_attn.in_proj_weight", "self_attn.out_proj"]


@pytest.mark.parametrize("layout", ["mask", "csr"])
def test_transformer_decoder_trains(layout):
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1)
    with pytest.warns(UserWarning, match="multihead_attn.out_proj") if layout == "csr" else _nothing():
        model = sm.sparsify(decoder, 0.2, layout=layout, generator=seeded(1))
    memory = torch.randn(3, 7, 16, generator=seeded(5))

    class WithMemory(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = model

        def forward(self, x):
            return self.decoder(x, memory)

    train(WithMemory())
    check_masked_weights_are_sparse(model)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(3, 5, 16, generator=seeded(6)), memory)).all()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_density_report_counts_every_weight_of_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), encoder(1), nn.Linear(16, 50))
    model = sm.sparsify(model, 0.1, exclude=("0", "2"), generator=seeded(1))
    report = sm.density_report(model)
    rows = {r.name: r for r in report.rows}
    attn = rows["1.layers.0.self_attn.in_proj_weight"]
    assert attn.sparse and attn.shape == (48, 16) and attn.kind == "SparseMultiheadAttention"
    assert attn.nnz == int(model[1].layers[0].self_attn.in_proj_weight_mask.sum())
    assert not rows["0"].sparse and rows["0"].nnz == rows["0"].numel == 800
    assert not rows["2"].sparse
    # The total is the model's true density: nonzero weights over all weights (matrices).
    weights = [p for p in model.parameters() if p.dim() >= 2]
    assert report.total.numel == sum(p.numel() for p in weights)
    assert report.total.nnz == sum(int(p.count_nonzero()) for p in weights)
    sparse_numel = sum(r.numel for r in report.rows if r.sparse)
    assert sum(r.nnz for r in report.rows if r.sparse) == round(0.1 * sparse_numel)
    assert report.to_dict()["layers"][0]["sparse"] is False


def test_multihead_attention_with_other_key_widths_is_sparse_and_keeps_its_masks():
    torch.manual_seed(0)
    mha = sm.sparsify(nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True), 0.25, generator=seeded())
    assert isinstance(mha, sm.SparseMultiheadAttention)
    names = [name for name, _, _ in mha.masked_weights()]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    q, k, v = (torch.randn(2, 3, d, generator=seeded(d)) for d in (16, 8, 12))
    optimizer = sm.optim.Adam(mha.parameters(), lr=1e-2)
    engine = sm.SparseMomentum(mha, optimizer, update_every=2, total_steps=20)
    for _ in range(4):
        optimizer.zero_grad()
        mha(q, k, v)[0].square().mean().backward()
        optimizer.step()
        engine.step()
    assert engine.updates == 2
    check_masked_weights_are_sparse(mha)
    # Copies, casts and checkpoints keep each mask attached to its weight.
    for other in (copy.deepcopy(mha), pickle.loads(pickle.dumps(mha)), copy.deepcopy(mha).double()):
        check_masked_weights_are_sparse(other)
    state = mha.state_dict()
    assert {"q_proj_weight_mask", "k_proj_weight_mask", "v_proj_weight_mask"} <= state.keys()
    fresh = sm.sparsify(nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True), 0.25, generator=seeded(9))
    fresh.load_state_dict(state, strict=True)
    check_masked_weights_are_sparse(fresh)
    torch.testing.assert_close(fresh(q, k, v)[0], mha(q, k, v)[0])


def test_sparse_attention_names_what_it_needs():
    with pytest.raises(TypeError, match="module must be a torch.nn.MultiheadAttention, got Linear"):
        sm.SparseMultiheadAttention.from_dense(nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match=r"counts must give one count for each projection weight \['in_proj_weight'\]"):
        sm.SparseMultiheadAttention.from_dense(nn.MultiheadAttention(4, 2), {"weight": 3})


@pytest.mark.parametrize("layout", ["mask", "csr"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_encoder_trains_with_other_growths(layout, growth):
    model = sparsify(encoder(1), layout)
    train(model, growth=growth)
    check_masked_weights_are_sparse(model)


def test_gse_with_grabo_names_the_attention_weight_it_cannot_sample():
    # GraBo samples from a layer's batches; attention's input projection is read inside
    # F.multi_head_attention_forward, where no layer sees them: the engine says so.
    model = sparsify(encoder(1), "mask")
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.in_proj_weight.*sampling='uniform'"):
        sm.SparseMomentum(model, optimizer, growth="gse", update_every=3, total_steps=20)
    model = sparsify(encoder(1), "mask")
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(model, optimizer, growth="gse", sampling="uniform", update_every=1, total_steps=20)
    model(torch.randn(3, 5, 16, generator=seeded(2))).sum().backward()
    optimizer.step()
    engine.step()
    assert engine.updates == 1
    check_masked_weights_are_sparse(model)


def test_from_dense_leaves_the_torch_layer_as_it_was():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    sparse = sm.SparseMultiheadAttention.from_dense(mha, {"in_proj_weight": 40}, generator=seeded())
    assert sparse.out_proj is not mha.out_proj and int(sparse.in_proj_weight_mask.sum()) == 40
    with torch.no_grad():
        sparse.out_proj.weight.zero_()
    for key, value in mha.state_dict().items():
        assert torch.equal(value, before[key]), key
