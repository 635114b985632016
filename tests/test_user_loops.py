"""Topology updates in the loops users write, for every growth method in both layouts.

The loop keeps ``loss`` (and the graph behind it) alive from one step into the next, as
``loss = loss_fn(model(x), y); loss.backward()`` written in a loop does; updates change
the layers' sizes (momentum redistribution), so a layer whose parameter changed shape
in place would fail the next backward. The training command is run the same way.
"""

import json

import pytest
import torch
from torch import nn

import sparsemom_ext as sm
from sparsemom_ext.train import cli

GROWTHS = ["momentum", "random", "gradient", "gse"]


def loader(batches=6, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(batches)]


@pytest.mark.parametrize("layout", ["csr", "mask"])
@pytest.mark.parametrize("growth", GROWTHS)
def test_the_epoch_loop_as_users_write_it(layout, growth):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    model = sm.sparsify(model, density=0.2, layout=layout)
    data, epochs = loader(), 4
    loss_fn = nn.CrossEntropyLoss()
    optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    engine = sm.SparseMomentum(model, optimizer, prune_rate=0.5, growth=growth, total_steps=epochs * len(data),
                               steps_per_epoch=len(data), window=3)
    initial = [w.count() for w in engine.weights]
    for epoch in range(epochs):
        for x, y in data:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            engine.step()
        engine.end_of_epoch()
    assert engine.updates == epochs - 1
    counts = [w.count() for w in engine.weights]
    assert sum(counts) == sum(initial) and counts != initial  # layers changed size, the total did not
    assert torch.isfinite(loss)


@pytest.mark.parametrize("growth", GROWTHS)
def test_the_training_command_in_the_csr_layout_updating_every_few_steps(tmp_path, growth):
    path = tmp_path / "run.json"
    argv = ["--model", "lenet300", "--density", "0.1", "--epochs", "2", "--layout", "csr", "--update-every", "5",
            "--growth", growth, "--window", "3", "--train-size", "400", "--test-size", "100", "--batch-size", "25",
            "--compare-dense", "0", "--no-progress", "--threads", "1", "--json", str(path)]
    assert cli.main(argv) == 0
    results = json.loads(path.read_text())
    updates = results["topology_updates"]
    steps = results["timing"]["steps"]
    assert len(updates) == 3 * ((steps - 1) // 5)  # three layers, every fifth step but the last
    initial = {"fc1.values": 23520, "fc2.values": 3000, "fc3.values": 100}  # 10% of each layer
    assert any(r["nnz"] != initial[r["layer"]] for r in updates), "the updates changed some layer's size"
    report = results["density_report"]
    assert report["total"]["nnz"] == round(0.1 * report["total"]["numel"])


def _cnn(inplace):
    # Every sparse layer is followed by an in-place ReLU, as torchvision's VGG classifier is.
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(12, 8, 3, stride=2),
                         nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(8 * 3 * 3, 24), nn.ReLU(inplace=inplace),
                         nn.Linear(24, 10))


@pytest.mark.parametrize("layout", ["csr", "mask"])
@pytest.mark.parametrize("growth,sampling", [("momentum", "grabo"), ("gse", "grabo"), ("gradient", "uniform")])
def test_in_place_activations_after_sparse_layers_change_nothing(layout, growth, sampling):
    """The engine reads each layer's output gradient; a ReLU(inplace=True) after the layer must
    not hide it (it did for the csr layer outputs that are reshapes of their op's result)."""
    runs = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = sm.sparsify(_cnn(inplace), density=0.3, layout=layout, generator=torch.Generator().manual_seed(1))
        optimizer = sm.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = sm.SparseMomentum(model, optimizer, prune_rate=0.4, growth=growth, sampling=sampling,
                                   update_every=4, total_steps=40, window=2)
        g = torch.Generator().manual_seed(2)
        for _ in range(9):
            x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            engine.step()
        assert engine.updates == 2
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        torch.testing.assert_close(runs[1][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("growth,sampling", [("gradient", "grabo"), ("gse", "uniform")])
def test_gradient_accumulation_grows_in_the_csr_layout_what_the_mask_layout_grows(growth, sampling):
    # Two backward passes per optimizer step. The mask layout scores by the weight's .grad
    # (their sum); the csr layout by what its taps received over the same passes. (Only
    # the first update is compared: after it the layouts differ by design, since the mask
    # layout's grown weights start with the momentum their position kept, csr ones at 0.)
    def train(layout):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64, dtype=torch.float64), nn.ReLU(),
                              nn.Linear(64, 10, dtype=torch.float64))
        model = sm.sparsify(model, density=0.2, layout=layout, generator=torch.Generator().manual_seed(1))
        optimizer = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = sm.SparseMomentum(model, optimizer, prune_rate=0.3, update_every=3, total_steps=12,
                                   growth=growth, sampling=sampling, redistribution="magnitude")
        loss_fn = nn.CrossEntropyLoss()
        for x, y in loader(batches=3, seed=2):
            optimizer.zero_grad()
            for half in (slice(0, 8), slice(8, 16)):
                loss = loss_fn(model(x[half].double()), y[half]) / 2
                loss.backward()
            optimizer.step()
            engine.step()
        assert engine.updates == 1
        return [m.mask for m in model if hasattr(m, "mask")], [r.grown for r in engine.history]

    (mask_masks, mask_grown), (csr_masks, csr_grown) = train("mask"), train("csr")
    assert mask_grown == csr_grown and sum(mask_grown) > 0
    for a, b in zip(mask_masks, csr_masks):
        assert torch.equal(a, b)
