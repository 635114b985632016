"""keep_freed_cpu_memory: after it, the large tensors of a repeated step are not faulted in
afresh. Run in a child process: the setting is the whole process's, and cannot be undone."""

import subprocess
import sys

import pytest

import sparsemom_ext as sm

# A "step" makes and frees a 64 MiB and a 21 MiB tensor, as a training step its activations.
# torch asks for 64-byte aligned memory (posix_memalign), for which glibc never hands back the
# block just freed of the same size, so the heap grows for the first steps (here up to 10 of
# them, by about 200 MiB) until the freed blocks merge; from then on every step reuses them.
CHILD = r"""
import resource, sys
import torch
import sparsemom_ext as sm

def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(16 << 20), torch.ones(16 << 20 // 3)
    del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = sm.keep_freed_cpu_memory() if sys.argv[1] == "keep" else None
print(applied, ",".join(str(faults_of_a_step()) for _ in range(40)))
"""


def _faults_per_step(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300,
                         check=True)
    applied, faults = out.stdout.split()
    return applied, [int(f) for f in faults.split(",")]


def test_the_tensors_of_a_repeated_step_are_not_faulted_in_again():
    pages = (64 << 20) // 4096
    _, default = _faults_per_step("default")
    # glibc's default: blocks of 32 MiB or more are mapped afresh and unmapped when freed.
    assert all(f >= pages for f in default[-20:]), f"page faults per step with glibc's defaults: {default}"
    applied, kept = _faults_per_step("keep")
    if applied == "False":
        pytest.skip("the C library is not glibc: keep_freed_cpu_memory changes nothing there")
    assert all(f < pages // 100 for f in kept[-20:]), f"page faults per step after keep_freed_cpu_memory: {kept}"


@pytest.mark.parametrize("kwargs, words", [
    (dict(mmap_threshold=0), "mmap_threshold must be an int in [1, 2**31 - 1]"),
    (dict(mmap_threshold=2**31), "mmap_threshold must be an int"),
    (dict(top_pad=1.5), "top_pad must be an int"),
    (dict(top_pad=True), "top_pad must be an int"),
])
def test_bad_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("*", r"\*")):
        sm.keep_freed_cpu_memory(**kwargs)
