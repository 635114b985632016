"""The build is what build_info() says, and every CPU ISA variant computes the same thing."""

import json
import os
import subprocess
import sys

import pytest
import torch

import sparsemom_ext as sm

ISAS = ["default", "avx2", "avx512"]


def test_build_info_describes_this_build():
    info = sm.build_info()
    assert info["version"] == sm.__version__
    # The extension must run with the torch it was compiled against.
    assert torch.__version__.startswith(info["torch_version"])
    assert info["cuda"] == (info["cuda_version"] is not None)
    assert info["cuda"] == info["cuda_kernels_registered"]
    assert info["cuda"] == bool(info["cuda_archs"])
    assert all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
    if torch.version.cuda is None:
        assert not info["cuda"], "a CPU-only torch cannot have CUDA kernels"
    assert info["cpu_isa"] in ISAS and info["cpu_isa_detected"] in ISAS
    assert ISAS.index(info["cpu_isa"]) <= ISAS.index(info["cpu_isa_detected"])
    assert info["num_threads"] == torch.get_num_threads()


def test_every_op_has_cpu_kernel_and_fake():
    for op in ("mask_apply_", "fused_sgd_step_", "fused_adam_step_", "magnitude_prune",
               "momentum_grow", "set_prune"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsemom::{op}", "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsemom::{op}", "Meta"), op


# Runs the fused and the selection ops on fixed inputs and prints a hash of the result
# bits, so runs with different SPARSEMOM_CPU_ISA values can be compared bit for bit.
_ISA_SCRIPT = r"""
import hashlib, json, torch, sparsemom_ext as sm
g = torch.Generator().manual_seed(7)
out = {"isa": sm.build_info()["cpu_isa"]}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    n = 70001  # threads split it; odd so vector loops have tails
    p, grad, buf = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    m1, m2 = torch.zeros(n, dtype=dtype), torch.rand(n, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) < 0.2
    sm.fused_sgd_step_(p, grad, buf, mask, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sm.fused_adam_step_(p, grad, m1, m2, None, mask, step=3, lr=1e-3, weight_decay=1e-2,
                        decoupled_weight_decay=True)
    q = torch.randn(n, generator=g).to(dtype)
    sm.mask_apply_(q, mask)
    # Selection: the sampled path (n >= 65536), the exact path (small n) and ties.
    tied = torch.randint(-2, 3, (n,), generator=g).to(dtype)
    small = n // 10
    selected = [sm.magnitude_prune(p, mask, 5000), sm.momentum_grow(grad, mask, 9999),
                sm.set_prune(p, mask, 7001), sm.magnitude_prune(tied, mask, 3000),
                sm.set_prune(tied, mask, 6001), sm.momentum_grow(tied, mask, 30000),
                sm.magnitude_prune(p[:small], mask[:small], 500),
                sm.momentum_grow(tied[:small], mask[:small], 700)]
    digest = hashlib.sha256()
    for t in (p, buf, m1, m2, q, *selected):
        digest.update(t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().tobytes())
    out[str(dtype)] = digest.hexdigest()
print(json.dumps(out))
"""


def _run_with_isa(isa):
    env = dict(os.environ, SPARSEMOM_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def test_isa_variants_are_bitwise_identical():
    detected = sm.build_info()["cpu_isa_detected"]
    runnable = ISAS[: ISAS.index(detected) + 1]
    results = {isa: _run_with_isa(isa) for isa in runnable}
    for isa, result in results.items():
        assert result.pop("isa") == isa  # the cap took effect
    baseline = results["default"]
    for isa in runnable[1:]:
        # No FMA contraction (-ffp-contract=off): every ISA rounds identically.
        assert results[isa] == baseline, f"{isa} differs from the portable build"
    if len(runnable) == 1:
        pytest.skip(f"this CPU supports only {detected}: nothing to compare against")
