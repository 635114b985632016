"""The training command (python -m sparsemom_ext.train): tiny end-to-end runs, argument errors,
resume-equals-uninterrupted, the data paths (IDX, CIFAR-10), the models and the speed-up arithmetic.

Runs here train on a few hundred images for a few epochs, so each takes a second or two.
No test asserts anything about a measured time (the machine's speed is not under test):
timings are only checked to exist and to enter the formulas as documented.
"""

import json
import math
import pickle
import platform
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsemom_ext as sm
from sparsemom_ext.train import checkpoint, cli, loop, models, speedup
from sparsemom_ext.train.data import _random_crop_and_flip, load_dataset

TINY = ["--train-size", "400", "--test-size", "200", "--batch-size", "25", "--compare-dense", "3",
        "--no-progress", "--threads", "1"]


def train(tmp_path, *argv, name="run"):
    """Run the command in-process; return (results JSON, stdout)."""
    path = tmp_path / f"{name}.json"
    assert cli.main([*TINY, *argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_tiny_lenet300_run_learns_and_reports_both_speedups(tmp_path, capsys):
    results = train(tmp_path, "--model", "lenet300", "--density", "0.3", "--epochs", "3")
    out = capsys.readouterr().out
    assert results["test"]["error"] < 0.6  # 10 classes: chance is 0.9
    assert [r["epoch"] for r in results["epochs"]] == [1, 2, 3]
    assert results["epochs"][-1]["train_loss"] < results["epochs"][0]["train_loss"]
    # Updates at the ends of epochs 1 and 2, none after the last: 3 layers x 2 updates.
    assert [r["prune_rate"] is not None for r in results["epochs"]] == [True, True, False]
    assert len(results["topology_updates"]) == 6
    report = results["density_report"]
    assert report["total"]["nnz"] == round(0.3 * report["total"]["numel"])
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2", "fc3"]
    assert results["timing"]["steps"] == 3 * math.ceil(360 / 25)
    measured = results["speedup"]["measured_training"]
    assert measured["dense_steps_timed"] == 3
    assert measured["speedup_median"] == pytest.approx(measured["dense_step_median_s"] / measured["step_median_s"])
    timing = results["timing"]
    assert timing["step_amortised_s"] == pytest.approx(timing["step_median_s"] + timing["update_s"] / timing["steps"])
    assert results["config"]["lr"] == 0.1 and results["config"]["weight_decay"] == 5e-4
    for text in ("test error", "estimated (the paper's method)", "measured (wall clock", "fc1", "epoch 3/3"):
        assert text in out


def test_conv_run_estimate_uses_input_density_and_writes_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # installed by scripts/setup.sh; optional for users
    results = train(tmp_path, "--model", "lenet5", "--epochs", "2", "--plot", str(tmp_path / "plots"))
    layers = {layer["name"]: layer for layer in results["speedup"]["layers"]}
    assert list(layers) == ["conv1", "conv2", "fc3", "fc4"]
    conv2, fc3 = layers["conv2"], layers["fc3"]
    assert 0 < conv2["input_density"] < 1  # ReLU + max-pool outputs: some zeros
    assert conv2["estimated_s"] == pytest.approx(conv2["dense_s"] * conv2["weight_density"] * conv2["input_density"])
    assert fc3["estimated_s"] == pytest.approx(fc3["dense_s"] * fc3["weight_density"])  # no activation factor
    est = results["speedup"]["estimated"]
    assert est["speedup"] == pytest.approx(est["dense_forward_s"] / est["sparse_forward_s"])
    assert all(r["estimated_speedup"] > 1 for r in results["epochs"])
    for name in ("curves.png", "density.png", "speedup.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_dense_baseline_has_no_engine_and_full_density(tmp_path):
    results = train(tmp_path, "--model", "lenet300", "--dense", "--epochs", "1")
    assert results["density_report"] is None and results["topology_updates"] == []
    assert all(layer["density"] == 1.0 for layer in results["layers"].values())
    assert "note" in results["speedup"]["measured_training"]


def compare_states(a, b, path=""):
    """Exact equality of nested checkpoint structures (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            compare_states(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            compare_states(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


TIMING_KEYS = {"train_s", "eval_s", "update_s", "step_median_s", "estimated_speedup"}


def test_resume_continues_to_the_identical_result(tmp_path):
    # wrn-10-1 has batch norm (running statistics) and dropout (torch's global RNG);
    # --augment draws crops and flips from the shuffling generator: every stream must be restored.
    options = ["--model", "wrn-10-1", "--epochs", "3", "--train-size", "200", "--augment", "--compare-dense", "0"]
    whole = train(tmp_path, *options, "--save", str(tmp_path / "a-{epoch}.pt"), name="whole")
    resumed = train(tmp_path, *options, "--resume", str(tmp_path / "a-1.pt"),
                    "--save", str(tmp_path / "b-{epoch}.pt"), name="resumed")
    a = checkpoint.load_checkpoint(tmp_path / "a-3.pt")
    b = checkpoint.load_checkpoint(tmp_path / "b-3.pt")
    for key in ("model", "optimizer", "scheduler", "engine", "engine_history", "rng", "epoch"):
        compare_states(a[key], b[key], key)
    assert a["engine"]["updates"] == 2
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in whole["epochs"]]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in resumed["epochs"]]
    assert whole["test"] == resumed["test"]
    assert whole["topology_updates"] == resumed["topology_updates"]
    assert resumed["timing"]["steps"] == whole["timing"]["steps"]


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    train(tmp_path, "--epochs", "1", "--save", str(tmp_path / "c.pt"))
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--epochs", "1", "--density", "0.1", "--resume", str(tmp_path / "c.pt")])
    assert info.value.code == 2
    assert "--density: checkpoint 0.05, now 0.1" in capsys.readouterr().err


def test_resume_accepts_an_option_newer_than_the_checkpoint_at_its_default(tmp_path, capsys):
    train(tmp_path, "--epochs", "1", "--save", str(tmp_path / "c.pt"))
    state = checkpoint.load_checkpoint(tmp_path / "c.pt")
    del state["config"]["prune_decay"]  # as if --prune-decay had been added after the checkpoint was written
    checkpoint.write_checkpoint(tmp_path / "old.pt", state)
    train(tmp_path, "--epochs", "1", "--resume", str(tmp_path / "old.pt"))
    assert "resumed from" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--epochs", "1", "--prune-decay", "linear", "--resume", str(tmp_path / "old.pt")])
    assert info.value.code == 2
    assert "--prune-decay: checkpoint 'cosine', now 'linear'" in capsys.readouterr().err


BAD_ARGS = [  # "{tmp}" stands for the test's temporary folder
    (["--model", "resnet9000"], "argument --model: unknown model 'resnet9000'"),
    (["--model", "wrn-15-2"], "wide resnet depth must be 6n + 4"),
    (["--density", "0"], "argument --density: must be in (0, 1], got 0"),
    (["--density", "1.5"], "argument --density: must be in (0, 1], got 1.5"),
    (["--density", "nan"], "argument --density: must be in (0, 1]"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["--dataset", "idx", "--data-dir", "{tmp}/missing"], "does not exist"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}"], "data_batch_1, data_batch_2"),
    (["--model", "vgg16"], "vgg16 is the 32x32-input variant"),
    (["--momentum", "0", "--no-nesterov"], "the sparsity engine rejects these options: SGD param_groups[0] "
                                           "has momentum=0"),
    (["--resume", "{tmp}/nothing.pt"], "--resume {tmp}/nothing.pt: no such file"),
    # LeNet-300-100 at 0.001: 266 weights for 410 output units
    (["--density", "0.001"], "--connectivity floor: connectivity='floor' keeps one input per output unit: the 3 "
                             "sparse layers (fc1.weight, fc2.weight, fc3.weight) have 410 output units"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
]


@pytest.mark.parametrize("argv,message", BAD_ARGS)
def test_bad_arguments_exit_2_with_a_message_naming_the_option(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--epochs", "1", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err


def test_python_dash_m_entry_point_exits_2_on_a_bad_model():
    proc = subprocess.run([sys.executable, "-m", "sparsemom_ext.train", "--model", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'nope'" in proc.stderr and "usage: sparsemom-train" in proc.stderr


@pytest.mark.parametrize("option, kept", [([], True), (["--no-keep-freed-memory"], False)])
def test_the_command_keeps_freed_memory_on_the_cpu_unless_told_not_to(tmp_path, option, kept):
    # As users run it, a program of its own: the setting is the whole process's.
    if kept and platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_cpu_memory applies only where the C library is glibc")
    path = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "sparsemom_ext.train", *TINY, "--epochs", "1", *option,
                           "--json", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(path.read_text())["environment"]["freed_cpu_memory_kept"] is kept
    assert ("freed memory kept" in proc.stdout) is kept

def idx_bytes(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


def test_idx_directory_trains_with_its_own_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for stem, n in (("train", 120), ("t10k", 40)):
        labels = rng.integers(0, 3, n)
        # Class k images are bright in their k-th horizontal band: learnable in one epoch.
        images = rng.integers(0, 60, (n, 12, 12)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 4 * k:4 * k + 4] += 150
        (root / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    data = load_dataset("idx", root, val_split=0.25, seed=3)
    assert data.num_classes == 3 and data.in_shape == (1, 12, 12)
    x = data.batch(data.train_x)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    results = train(tmp_path, "--dataset", "idx", "--data-dir", str(root), "--density", "0.5", "--epochs", "3",
                    "--batch-size", "10")
    assert results["test"]["error"] < 0.3


def write_cifar_batches(root, n):
    rng = np.random.default_rng(1)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_directory_through_the_command(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", 20)
    results = train(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", "wrn-10-1",
                    "--epochs", "1", "--augment")
    assert results["config"]["dataset"] == "cifar10"
    assert results["timing"]["steps"] == math.ceil(90 / 25)  # 100 images, 10 held out
    assert {layer["shape"][1] for layer in results["speedup"]["layers"] if layer["name"] == "conv1"} == {3}


def test_default_validation_split_is_the_last_images_for_every_seed():
    everything = load_dataset("mnist", val_split=0.0, train_size=500)
    for seed in (0, 5):
        data = load_dataset("mnist", val_split=0.1, seed=seed, train_size=500)
        assert torch.equal(data.train_x, everything.train_x[:450])
        assert torch.equal(data.train_y, everything.train_y[:450])
        assert torch.equal(data.val_x, everything.train_x[450:]) and torch.equal(data.val_y, everything.train_y[450:])


def test_random_validation_split_is_seeded_and_disjoint():
    a = load_dataset("mnist", val_split=0.1, seed=5, train_size=500, val_split_mode="random")
    b = load_dataset("mnist", val_split=0.1, seed=5, train_size=500, val_split_mode="random")
    c = load_dataset("mnist", val_split=0.1, seed=6, train_size=500, val_split_mode="random")
    assert len(a.val_y) == 50 and len(a.train_y) == 450
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)
    train_rows = {bytes(x.numpy()) for x in a.train_x}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val_x)
    with pytest.raises(ValueError, match="--val-split-mode must be one of last, random; got 'first'"):
        load_dataset("mnist", val_split=0.1, train_size=500, val_split_mode="first")


def test_connectivity_option_reaches_sparsify_and_the_engine(tmp_path):
    # At 0.002 LeNet-300-100 has 532 weights for 410 units: at the reference many lose them all.
    for connectivity, disconnected in (("floor", False), ("reference", True)):
        results = train(tmp_path, "--epochs", "2", "--compare-dense", "0", "--density", "0.002",
                        "--connectivity", connectivity, name=connectivity)
        assert results["config"]["connectivity"] == connectivity
        nnz = {r["layer"]: r["nnz"] for r in results["topology_updates"]}
        assert (min(nnz["fc2.weight"] - 100, nnz["fc3.weight"] - 10) < 0) == disconnected, nnz


def test_split_mode_option_reaches_the_run(tmp_path):
    last = train(tmp_path, "--epochs", "1", "--compare-dense", "0", name="last")
    random = train(tmp_path, "--epochs", "1", "--compare-dense", "0", "--val-split-mode", "random", name="random")
    assert last["config"]["val_split_mode"] == "last" and random["config"]["val_split_mode"] == "random"
    # other images train and validate
    assert last["epochs"][0]["train_loss"] != random["epochs"][0]["train_loss"]


def test_augmentation_crops_a_window_of_the_padded_image_and_flips():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = _random_crop_and_flip(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flipped = 0
    for img, src in zip(out, padded):
        windows = [src[:, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
        plain = any(torch.equal(img, w) for w in windows)
        mirrored = any(torch.equal(img.flip(2), w) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 10 < flipped < 54  # about half


@pytest.mark.parametrize("name,shape,params", [
    ("lenet300", (1, 28, 28), 266_610),
    ("lenet5", (1, 28, 28), 431_080),
    ("vgg16", (3, 32, 32), 15_255_626),
    ("wrn-16-8", (3, 32, 32), 10_961_370),
    ("wrn-28-2", (3, 32, 32), 1_467_610),
])
def test_models_have_the_published_sizes_and_every_weight_layer_goes_sparse(name, shape, params):
    torch.manual_seed(0)
    model = models.build_model(name, shape, 10)
    assert sum(p.numel() for p in model.parameters()) == params
    n_layers = len(speedup.weight_layers(model))
    sm.sparsify(model, density=0.05)
    report = sm.density_report(model)
    assert len(report.rows) == n_layers  # first and last layers included, as in the paper
    if name in ("lenet300", "lenet5"):
        assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_mlp_widths_option_sets_the_hidden_layers(tmp_path):
    assert cli.build_parser().parse_args([]).widths == (4096, 4096, 4096)
    results = train(tmp_path, "--model", "mlp", "--widths", "64-32", "--epochs", "1", "--compare-dense", "0")
    shapes = [layer["shape"] for layer in results["speedup"]["layers"]]
    assert shapes == [[64, 784], [32, 64], [10, 32]]


def test_estimated_speedup_formula():
    dense = {"conv": 3.0, "fc": 1.0}
    kinds = {"conv": "conv", "fc": "linear"}
    # conv: 3 * 0.1 * 0.5 = 0.15; fc: 1 * 0.2 (its input density is not used) -> 4 / 0.35
    value = speedup.estimated_speedup(dense, kinds, {"conv": 0.1, "fc": 0.2}, {"conv": 0.5, "fc": 0.01})
    assert value == pytest.approx(4.0 / 0.35)


def test_a_diverging_run_stops_at_that_epoch_with_a_message_and_exit_1(tmp_path, capsys):
    # At lr 1e4 the weights overflow within the first epoch: the run must stop there, not
    # train two more epochs of NaN, and must not checkpoint the NaN state.
    path = tmp_path / "run.json"
    argv = [*TINY, "--epochs", "3", "--lr", "1e4", "--save", str(tmp_path / "c-{epoch}.pt"), "--json", str(path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "training diverged: the training loss of epoch 1 is" in err and "lower --lr" in err
    assert len(err.strip().splitlines()) == 1
    results = json.loads(path.read_text())
    assert results["diverged"]["epoch"] == 1 and results["diverged"]["lr"] == 1e4
    assert results["epochs"] == [] and "test" not in results
    assert not list(tmp_path.glob("c-*.pt"))  # the diverged epoch is not checkpointed


def test_a_run_back_at_chance_stops_as_collapsed_with_a_message_and_exit_1(tmp_path, capsys):
    # At lr 0.5 without the lr ramp this tiny run learns a little (training loss 2.31, then 2.04:
    # below chance, 2.29, in epoch 2) and then blows up without reaching NaN: epoch 3 (4.64) is
    # worse than chance. (With the default ramp it does not collapse.)
    path = tmp_path / "run.json"
    argv = [*TINY, "--epochs", "5", "--lr", "0.5", "--lr-ramp-steps", "0", "--save", str(tmp_path / "c-{epoch}.pt"), "--json", str(path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "training collapsed: the training loss of epoch 3 is" in err and "no better than chance" in err
    results = json.loads(path.read_text())
    collapsed = results["collapsed"]
    assert collapsed["epoch"] == 3 and collapsed["best_epoch"] == 2
    assert collapsed["train_loss"] >= 0.98 * collapsed["chance_loss"] > collapsed["best_train_loss"]
    assert collapsed["chance_loss"] == pytest.approx(math.log(10), abs=0.02)  # 360 images of 10 classes
    assert [r["epoch"] for r in results["epochs"]] == [1, 2] and "test" not in results
    assert len(results["topology_updates"]) == 2 * 3  # the updates after epochs 1 and 2, 3 layers each
    assert {r["units_without_input"] for r in results["topology_updates"]} == {0}
    assert sorted(p.name for p in tmp_path.glob("c-*.pt")) == ["c-1.pt", "c-2.pt"]  # not the collapsed epoch


def test_a_first_epoch_at_chance_is_not_a_collapse():
    labels = torch.arange(10).repeat(7)
    assert loop.chance_loss(labels) == pytest.approx(math.log(10))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loop.chance_loss(torch.tensor([0, 0, 0, 1])) == pytest.approx(entropy)
    run = loop.Run.__new__(loop.Run)  # only the check's inputs: the history and the chance loss
    run.chance_loss, run.history = math.log(10), []
    run._check_not_collapsed(1, 2.31, 0.1)  # nothing learnt yet: training may still start
    run.history = [{"epoch": 1, "train_loss": 2.31}, {"epoch": 2, "train_loss": 1.2}]
    run._check_not_collapsed(3, 2.2, 0.1)  # worse, but below chance
    with pytest.raises(loop.TrainingCollapsed, match="epoch 3 is 2.3100.*after 1.2000 at epoch 2"):
        run._check_not_collapsed(3, 2.31, 0.1)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing trained
def refused(capsys, *argv):
    """Run the command expecting a refusal: exit status 2, one line on stderr, no epoch trained."""
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--epochs", "1", *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert "Traceback" not in captured.err and "epoch 1/1" not in captured.out
    return captured.err


@pytest.mark.parametrize("argv,message", [
    (["--lr", "inf"], "argument --lr: must be in (0, 1e6], got inf"),
    (["--lr=-inf"], "argument --lr: must be in (0, 1e6], got -inf"),
    (["--lr", "1e308"], "argument --lr: must be in (0, 1e6], got 1e308"),
    (["--lr", "nan"], "argument --lr: must be in (0, 1e6], got nan"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be in [0, 1], got inf"),
    (["--weight-decay", "1e308"], "argument --weight-decay: must be in [0, 1], got 1e308"),
    (["--lr-decay", "inf"], "argument --lr-decay: must be in (0, 1], got inf"),
    (["--candidates", "inf"], "argument --candidates: must be > 0, got inf"),
    (["--momentum", "inf"], "argument --momentum: must be in [0, 1), got inf"),
    (["--lr-ramp-steps", "-1"], "argument --lr-ramp-steps: must be a non-negative integer, got -1"),
    (["--lr-ramp-start", "0"], "argument --lr-ramp-start: must be in (0, 1], got 0"),
    (["--lr-ramp-start", "nan"], "argument --lr-ramp-start: must be in (0, 1], got nan"),
])
def test_numbers_must_be_finite_and_in_range_at_parse_time(capsys, argv, message):
    err = refused(capsys, *argv)
    assert message in err and "usage: sparsemom-train" in err


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A checkpoint of a one-epoch run, and the options that resume it."""
    folder = tmp_path_factory.mktemp("saved")
    options = ["--density", "0.2", "--compare-dense", "0"]
    assert cli.main([*TINY, "--epochs", "1", *options, "--save", str(folder / "c.pt")]) == 0
    return folder / "c.pt", options


def resume_refused(capsys, saved_run, path):
    return refused(capsys, *saved_run[1], "--resume", str(path))


def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path, capsys, saved_run):
    data = bytearray(saved_run[0].read_bytes())
    for at in range(len(data) // 2, len(data) // 2 + 64):  # inside the payload: the tensors' bytes
        data[at] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    err = resume_refused(capsys, saved_run, tmp_path / "flipped.pt")
    assert "the checkpoint is damaged (the sha256 of its payload does not match" in err


@pytest.mark.parametrize("kind", ["random bytes", "code", "truncated"])
def test_a_malformed_resume_file_is_one_line_without_torch_text(tmp_path, capsys, saved_run, kind):
    path = tmp_path / "bad.pt"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "code":
        torch.save(RunsCode(), path)  # weights_only=True must refuse to run it
    else:
        path.write_bytes(saved_run[0].read_bytes()[:1000])
    err = resume_refused(capsys, saved_run, path)
    assert f"--resume {path}: not a checkpoint of this training command" in err
    assert "weights_only=False" not in err and not RunsCode.ran


class RunsCode:
    """A pickle that would call a function on load (it only records that it ran)."""

    ran = False

    def __reduce__(self):
        return (setattr, (RunsCode, "ran", True))


def edited_checkpoint(tmp_path, saved_run, edit):
    """The saved checkpoint with ``edit`` applied to its state, written with a valid sha256."""
    state = checkpoint.load_checkpoint(saved_run[0])
    edit(state)
    checkpoint.write_checkpoint(tmp_path / "edited.pt", state)
    return tmp_path / "edited.pt"


def flip_first_mask(state, to_float=False):
    layer = sorted(state["engine"]["layers"])[0]
    mask = state["engine"]["layers"][layer]["mask"]
    state["engine"]["layers"][layer]["mask"] = mask.float() * 0.5 if to_float else mask.roll(1, 0)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("config"), "the checkpoint has no 'config' entry"),
    (lambda s: s.pop("engine"), "the checkpoint has no 'engine' entry"),
    (lambda s: s["rng"].pop("numpy"), "the checkpoint's 'rng' entry has no ['numpy']"),
    (lambda s: s.update(epoch="1"), "the checkpoint's 'epoch' entry is a str"),
    (flip_first_mask, "the checkpoint's state of the engine does not fit this run: the engine's mask of 'fc1.weight' "
                      "differs from the model's"),
    (lambda s: flip_first_mask(s, to_float=True), "state_dict mask of 'fc1.weight' must be a bool tensor"),
    (lambda s: s["engine"].pop("generator"), "state_dict is missing ['generator']"),
    (lambda s: s["model"].pop("fc2.mask"), "the checkpoint's state of the model does not fit this run"),
    (lambda s: s["model"].update({"fc2.mask": s["model"]["fc2.mask"] * 0.5}),
     "the checkpoint's state of the model does not fit this run: its 'fc2.mask' is torch.float32, the model's is "
     "torch.bool"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_one_line(tmp_path, capsys, saved_run, edit, message):
    err = resume_refused(capsys, saved_run, edited_checkpoint(tmp_path, saved_run, edit))
    assert message in err, err


def test_a_checkpoint_of_an_older_format_is_refused_with_its_format(tmp_path, capsys, saved_run):
    state = checkpoint.load_checkpoint(saved_run[0])
    torch.save({**state, "format": 2}, tmp_path / "old.pt")  # format 2: the state itself, no sha256
    err = resume_refused(capsys, saved_run, tmp_path / "old.pt")
    assert f"a checkpoint of format 2, written by an older version of this command; this one reads format {checkpoint.FORMAT}" in err


@pytest.mark.parametrize("option,target,message", [
    ("--save", "{file}/c.pt", "{file} is not a directory"),
    ("--save", "{file}/sub/c-{epoch}.pt", "{file} is not a directory"),
    ("--json", "{tmp}", "is a directory; give the path of a file"),
    ("--json", "/dev/full", "exists and is not a regular file"),
    ("--plot", "{file}", "exists and is not a directory"),
])
def test_output_paths_that_cannot_be_written_are_refused_before_training(tmp_path, capsys, option, target, message):
    (tmp_path / "file").write_text("a regular file")
    fill = {"{file}": str(tmp_path / "file"), "{tmp}": str(tmp_path)}
    for key, value in fill.items():
        target, message = target.replace(key, value), message.replace(key, value)
    if option == "--plot":
        pytest.importorskip("matplotlib")
    err = refused(capsys, option, target)
    assert f"{option} {target}: {message}" in err, err


def test_an_output_on_a_full_device_is_refused_before_training(tmp_path, capsys, monkeypatch):
    # The probe write fails as on a full device; the run must not start.
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", full)
    err = refused(capsys, "--json", str(tmp_path / "out" / "run.json"))
    assert f"--json {tmp_path / 'out' / 'run.json'}: cannot write in {tmp_path} (No space left on device)" in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_write_failing_during_the_run_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "--epochs", "1", "--compare-dense", "0", "--save", str(tmp_path / "c.pt")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"sparsemom-train: error: --save {tmp_path / 'c.pt'}: cannot write it (No space left on device)\n"


def idx_int32_bytes(arr):
    arr = np.asarray(arr, dtype=np.int64)
    return bytes([0, 0, 0x0C, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(">i4").tobytes()


@pytest.mark.parametrize("case,message", [
    ("no test images", "the test split has no images"),
    ("label -1", "the training split has labels in [-1, 2]; they must be class indices in [0, 65536)"),
    ("label 2**31-1", "the test split has labels in [0, 2147483647]; they must be class indices in [0, 65536)"),
    ("0x0 images", "the training split has images of shape (1, 0, 0); they must be (C, H, W) with at least one "
                   "pixel"),
])
def test_bad_data_is_refused_before_training(tmp_path, capsys, case, message):
    root = tmp_path / "idx"
    root.mkdir()
    rng = np.random.default_rng(0)
    for stem, n in (("train", 40), ("t10k", 0 if case == "no test images" else 10)):
        side = 0 if case == "0x0 images" else 6
        labels = rng.integers(0, 3, n)
        if case == "label -1" and stem == "train":
            labels[5] = -1
        if case == "label 2**31-1" and stem == "t10k":
            labels[3] = 2**31 - 1
        (root / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 255, (n, side, side))))
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(idx_int32_bytes(labels))
    err = refused(capsys, "--dataset", "idx", "--data-dir", str(root), "--train-size", "40", "--test-size", "10")
    assert message in err, err
