"""A csr-layout state_dict loads into the mask layout and back (strict), as a user moves a checkpoint."""

import pytest
import torch
from torch import nn

import sparsemom_ext as sm


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 4))


def trained(layout, seed):
    """A sparsified MLP after a few steps with two topology updates."""
    model = sm.sparsify(mlp(), 0.15, layout=layout, generator=seeded(seed))
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sm.SparseMomentum(model, optimizer, prune_rate=0.3, update_every=2, total_steps=20)
    x, y = torch.randn(16, 20, generator=seeded(1)), torch.randint(0, 4, (16,), generator=seeded(2))
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        engine.step()
    assert engine.updates == 2
    return model


def train_one_step(model):
    optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer.zero_grad()
    model(torch.randn(4, 20, generator=seeded(7))).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("source, target", [("csr", "mask"), ("mask", "csr")])
def test_state_dict_loads_into_the_other_layout(source, target):
    saved = trained(source, seed=3)
    model = sm.sparsify(mlp(), 0.15, layout=target, generator=seeded(4))  # other masks, same architecture
    model.load_state_dict(saved.state_dict(), strict=True)
    x = torch.randn(8, 20, generator=seeded(5))
    torch.testing.assert_close(model(x), saved(x), rtol=1e-5, atol=1e-6)
    for name in ("0", "2", "4"):
        a, b = saved.get_submodule(name), model.get_submodule(name)
        assert b.layout == target
        assert torch.equal(b.mask, a.mask) and b.nnz == a.nnz
        assert torch.equal(b.dense_weight(), a.dense_weight())
        if target == "mask":
            assert sm.mask_of(b.weight) is b.mask
    # And back: the converted model's own state_dict loads into the first layout.
    again = sm.sparsify(mlp(), 0.15, layout=source, generator=seeded(6))
    again.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(again(x), saved(x), rtol=1e-5, atol=1e-6)
    train_one_step(model)  # the loaded model trains (optimizer built after loading)


def test_more_nonzeros_than_the_csr_layer_has_slots_get_a_larger_capacity():
    source = sm.SparseLinear(30, 20, density=0.6, generator=seeded())
    layer = sm.CsrLinear(30, 20, density=0.05, generator=seeded(1))
    assert layer.capacity < source.nnz
    layer.load_state_dict(source.state_dict(), strict=True)
    assert layer.nnz == source.nnz and layer.capacity >= source.nnz
    assert not layer.values.detach()[layer.nnz:].any()  # idle slots are zero
    x = torch.randn(5, 30, generator=seeded(2))
    torch.testing.assert_close(layer(x), source(x), rtol=1e-5, atol=1e-6)
    # Fewer nonzeros than slots: the layer keeps its capacity.
    small = sm.SparseLinear(30, 20, density=0.01, generator=seeded(3))
    capacity = layer.capacity
    layer.load_state_dict(small.state_dict(), strict=True)
    assert layer.capacity == capacity and layer.nnz == small.nnz
    torch.testing.assert_close(layer(x), small(x), rtol=1e-5, atol=1e-6)


def test_a_mismatched_checkpoint_is_an_error_naming_the_layer():
    csr_model = nn.Sequential(sm.CsrLinear(10, 6, density=0.3, generator=seeded()))
    wrong = nn.Sequential(sm.SparseLinear(10, 7, density=0.3, generator=seeded()))
    with pytest.raises(RuntimeError, match=r"invalid mask-layout weight for 0\.: weight and mask must have shape"):
        csr_model.load_state_dict(wrong.state_dict())

    mask_model = nn.Sequential(sm.SparseLinear(10, 6, density=0.3, generator=seeded()))
    state = csr_model.state_dict()
    state["0.col_idx"] = state["0.col_idx"].flip(0)  # columns no longer sorted within rows
    with pytest.raises(RuntimeError, match=r"invalid CSR structure for 0\.: "):
        mask_model.load_state_dict(state)
    state = csr_model.state_dict()
    state["0.row_ptr"][-1] = 999
    with pytest.raises(RuntimeError, match=r"row_ptr must be 1-D and end at nnz <= capacity"):
        mask_model.load_state_dict(state)
