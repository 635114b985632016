"""Two processes under torch.distributed (gloo), the user's DDP script (tests/ddp_train.py):
after every topology update every rank holds the same topology, weights and optimizer state,
for every growth x layout, with redistribution changing the layers' sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsemom_ext as sm

SCRIPT = Path(__file__).with_name("ddp_train.py")
GROWTHS = ("momentum", "random", "gradient", "gse")


# A gloo worker process now and then aborts with this (a C++ thread of torch's left joinable;
# the extension starts none): 2 of 3 clean-clone CI runs lost one DDP test to it, reruns pass.
# One relaunch on exactly that abort; anything else, or the abort twice, fails the test.
GLOO_ABORT = "terminate called without an active exception"


def run_ddp(tmp_path, configs, *extra):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), "--configs", ",".join(configs), "--out", str(out), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        out.unlink(missing_ok=True)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def check_identical(results, configs):
    assert [r["config"] for r in results] == list(configs)
    for r in results:
        assert len(r["identical"]) == 4, r  # updates at steps 3, 6, 9, 12
        assert all(r["identical"]), r
        sizes = r["nnz"]
        assert len({sum(s) for s in sizes}) == 1, r  # the global count never drifts


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_every_growth_and_layout_keeps_the_ranks_identical(tmp_path):
    configs = [f"{growth}:{layout}" for growth in GROWTHS for layout in ("mask", "csr")]
    proc, results = run_ddp(tmp_path, configs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_identical(results, configs)
    for r in results:  # momentum redistribution moved budget between layers
        assert len({tuple(s) for s in r["nnz"]}) > 1, r


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_wider_matrix_keeps_the_ranks_identical(tmp_path):
    configs = ([f"{g}:{layout}:uniform" for g in ("gse", "momentum") for layout in ("mask", "csr")]
               + [f"{g}:{layout}:grabo:adam" for g in GROWTHS for layout in ("mask", "csr")]
               + [f"{g}:{layout}:grabo:sgd:global" for g in ("momentum", "gradient", "gse") for layout in ("mask", "csr")])
    proc, results = run_ddp(tmp_path, configs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_identical(results, configs)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_csr_convolutions_keep_the_ranks_identical(tmp_path):
    configs = [f"{growth}:csr:grabo:sgd:layer:cnn" for growth in GROWTHS] + ["gse:csr:uniform:adam:global:cnn"]
    proc, results = run_ddp(tmp_path, configs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_identical(results, configs)
    for r in results[:len(GROWTHS)]:  # momentum redistribution moved budget between the layers
        assert len({tuple(s) for s in r["nnz"]}) > 1, r


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_csr_convolutions_with_batch_norm_and_batch_innermost_activations_keep_the_ranks_identical(tmp_path):
    configs = [f"{growth}:csr:grabo:sgd:layer:cnn_bn" for growth in ("momentum", "gse")]
    proc, results = run_ddp(tmp_path, configs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_identical(results, configs)
    for r in results:
        assert len({tuple(s) for s in r["nnz"]}) > 1, r
        # the batch-innermost modules trained, not torch's on a copy
        assert {"sparsemom_ext.nn.csr_layout.CsrConv2d", "sparsemom_ext.nn.batch_innermost.BatchNorm2d",
                "sparsemom_ext.nn.batch_innermost.MaxPool2d"} <= set(r["classes"]), r["classes"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_ranks_that_would_disagree_are_stopped_before_anything_is_written(tmp_path):
    proc, results = run_ddp(tmp_path, ["random:mask"], "--seed-per-rank")
    assert proc.returncode != 0 and results is None
    assert "the ranks disagree on the new topology of" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_fsdp_is_refused_by_name(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        model = sm.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), density=0.5)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))  # FSDP2; FSDP1 needs an accelerator
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with pytest.raises(ValueError, match="does not support FSDP"):
            sm.SparseMomentum(model, opt, total_steps=10)
    finally:
        torch.distributed.destroy_process_group()


def test_a_process_group_without_torch_distributed_is_refused_and_nothing_changes():
    model = sm.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), density=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = sm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="process_group was given, but torch.distributed is not initialized"):
        sm.SparseMomentum(model, opt, total_steps=10, process_group=object())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
