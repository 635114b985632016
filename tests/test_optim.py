"""sparsemom_ext.optim against torch.optim followed by weight.mul_(mask)."""

import copy

import pytest
import torch

import sparsemom_ext as sm

OPTIMIZERS = [
    (sm.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    (sm.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (sm.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    (sm.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.2, maximize=True)),
    (sm.optim.Adam, torch.optim.Adam, dict(lr=1e-2)),
    (sm.optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    (sm.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (sm.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, maximize=True)),
]


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10)
    ).to(dtype)


def masks_for(model, density=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=g) < density
            for name, p in model.named_parameters() if name.endswith("weight")}


def train(model, optimizer, masks, steps, after_step=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 20, generator=g, dtype=next(model.parameters()).dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if after_step is not None:
            after_step()


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", OPTIMIZERS,
                         ids=[f"{o.__name__}-{i}" for i, (o, _, _) in enumerate(OPTIMIZERS)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_optimizer_matches_torch_optim_plus_mask(ours_cls, torch_cls, kwargs, dtype):
    ours, theirs = make_model(dtype), make_model(dtype)
    masks = masks_for(ours)
    for name, p in ours.named_parameters():
        if name in masks:
            sm.attach_mask(p, masks[name])
            sm.mask_apply_(p.data, masks[name])
    for name, p in theirs.named_parameters():
        if name in masks:
            p.data.mul_(masks[name])

    def mask_theirs():
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if name in masks:
                    p.mul_(masks[name])

    opt_ours = ours_cls(ours.parameters(), **kwargs)
    opt_theirs = torch_cls(theirs.parameters(), foreach=False, **kwargs)
    train(ours, opt_ours, masks, steps=5)
    train(theirs, opt_theirs, masks, steps=5, after_step=mask_theirs)

    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=name)
        if name in masks:
            assert not p[~masks[name]].any(), f"{name} is nonzero at inactive positions"
    state_ours = opt_ours.state_dict()["state"]
    state_theirs = opt_theirs.state_dict()["state"]
    assert state_ours.keys() == state_theirs.keys()
    for index in state_theirs:
        assert state_ours[index].keys() == state_theirs[index].keys()
        for key, value in state_theirs[index].items():
            torch.testing.assert_close(state_ours[index][key], value, **tol, msg=f"state[{index}][{key}]")


def test_unmasked_parameters_take_the_parent_step_exactly():
    ours, theirs = make_model(torch.float32), make_model(torch.float32)
    opt_ours = sm.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    train(ours, opt_ours, {}, steps=3)
    train(theirs, opt_theirs, {}, steps=3)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_momentum_of_inactive_positions_keeps_moving():
    model = make_model(torch.float64)
    masks = masks_for(model)
    weight = model[0].weight
    sm.attach_mask(weight, masks["0.weight"])
    opt = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, masks, steps=2)
    buf = opt.state[weight]["momentum_buffer"]
    inactive = ~masks["0.weight"]
    assert buf[inactive].abs().sum() > 0
    assert not weight[inactive].any()


@pytest.mark.parametrize("cls,kwargs", [(sm.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                        (sm.optim.AdamW, dict(lr=1e-2))])
def test_state_dict_round_trips_with_torch_optim(cls, kwargs):
    torch_cls = cls.__mro__[cls.__mro__.index(sm.optim._MaskedStepMixin) + 1]
    model = make_model(torch.float32)
    masks = masks_for(model)
    for name, p in model.named_parameters():
        if name in masks:
            sm.attach_mask(p, masks[name])
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, masks, steps=2)
    plain = torch_cls(model.parameters(), **kwargs)
    plain.load_state_dict(opt.state_dict())
    again = cls(model.parameters(), **kwargs)
    again.load_state_dict(plain.state_dict())
    a, b = opt.state_dict(), again.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(b["state"][index][key], value)


def test_step_hooks_run_once_and_closure_loss_is_returned():
    torch.optim.SGD(make_model().parameters(), lr=0.1)  # makes torch.optim.SGD.step hooked
    model = make_model()
    sm.attach_mask(model[0].weight, masks_for(model)["0.weight"])
    opt = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    x = torch.randn(4, 20, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss_before = model(x).sum()
    loss = opt.step(closure)
    assert calls == ["pre", "post"]
    assert torch.equal(loss.detach(), loss_before)  # the closure ran before the update
    with torch.no_grad():
        assert not torch.equal(model(x).sum(), loss_before)  # and the update happened


def test_unfusable_group_falls_back_to_parent_step_and_mask():
    ours, theirs = make_model(torch.float32), make_model(torch.float32)
    masks = masks_for(ours)
    sm.attach_mask(ours[0].weight, masks["0.weight"])
    # torch's own fused Adam kernel (CPU and CUDA) is not ours to fuse with.
    opt_ours = sm.optim.Adam(ours.parameters(), lr=1e-2, fused=True)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True)

    def mask_theirs():
        with torch.no_grad():
            theirs[0].weight.mul_(masks["0.weight"])

    with torch.no_grad():
        ours[0].weight.mul_(masks["0.weight"])
        mask_theirs()
    train(ours, opt_ours, masks, steps=3)
    train(theirs, opt_theirs, masks, steps=3, after_step=mask_theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q)


def test_bad_attached_mask_fails_before_any_update():
    model = make_model()
    masks = masks_for(model)
    sm.attach_mask(model[0].weight, masks["0.weight"])
    sm.attach_mask(model[2].weight, masks["2.weight"])
    setattr(model[2].weight, "_sparsemom_mask", torch.ones(3, 3, dtype=torch.bool))  # corrupted later
    opt = sm.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 20, dtype=torch.float64)).sum().backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\].*shape"):
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert len(opt.state) == 0
    assert all(p.grad is not None for p in model.parameters())


def test_constructor_rejects_bad_hyperparameters():
    params = make_model().parameters()
    with pytest.raises(ValueError, match="learning rate"):
        sm.optim.SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="beta parameter"):
        sm.optim.Adam(make_model().parameters(), betas=(1.0, 0.999))


def test_sparse_gradient_falls_back_to_parent_step_and_mask():
    torch.manual_seed(0)
    ours = torch.nn.Embedding(10, 4, sparse=True)
    theirs = copy.deepcopy(ours)
    mask = torch.rand(10, 4) < 0.5
    sm.attach_mask(ours.weight, mask)
    opt_ours = sm.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    index = torch.tensor([1, 3, 3, 7])
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        model(index).sum().backward()
        assert model.weight.grad.is_sparse
        opt.step()
    with torch.no_grad():
        theirs.weight.mul_(mask)
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert not ours.weight[~mask].any()


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", OPTIMIZERS,
                         ids=[f"{o.__name__}-{i}" for i, (o, _, _) in enumerate(OPTIMIZERS)])
def test_csr_values_are_stepped_on_their_used_slots_only(ours_cls, torch_cls, kwargs):
    # A CsrLinear's idle slots (past nnz) are zero in weight, gradient and state: the fused
    # step skips them and gives what torch.optim gives on the whole tensor.
    def model():
        torch.manual_seed(0)
        return sm.sparsify(torch.nn.Sequential(torch.nn.Linear(20, 24), torch.nn.Tanh(), torch.nn.Linear(24, 6)),
                           density=0.3, layout="csr", generator=torch.Generator().manual_seed(1)).double()
    ours, theirs = model(), model()
    layer = ours[0]
    assert sm.sparsity.masks.used_slots_of(layer.values) == layer.nnz < layer.capacity
    opt_ours = ours_cls(ours.parameters(), **kwargs)
    opt_theirs = torch_cls(theirs.parameters(), foreach=False, **kwargs)
    train(ours, opt_ours, {}, steps=4)
    train(theirs, opt_theirs, {}, steps=4)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    for p in (ours[0].values, ours[2].values):
        assert not p[sm.sparsity.masks.used_slots_of(p):].any()
        for key, state in opt_ours.state[p].items():
            if state.dim() == 1:
                assert not state[sm.sparsity.masks.used_slots_of(p):].any(), key
    # The slots follow the layer through copies and conversions.
    twin = copy.deepcopy(ours)
    assert sm.sparsity.masks.used_slots_of(twin[0].values) == ours[0].nnz
    assert sm.sparsity.masks.used_slots_of(ours.float()[0].values) == ours[0].nnz
