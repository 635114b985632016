"""Build of sparsemom_ext: a C++ extension, plus CUDA kernels when possible.

CUDA kernels are compiled when the installed torch is a CUDA build and nvcc is
found -- whether or not a GPU is visible, so GPU wheels can be built on CPU
machines. Environment variables:

  SPARSEMOM_FORCE_CPU=1     never compile CUDA kernels.
  SPARSEMOM_FORCE_CUDA=1    fail unless CUDA kernels can be compiled.
  CUDA_HOME                 the CUDA toolkit (folder with bin/nvcc and include/).
                            Found from nvcc when unset, even when nvcc on PATH is
                            a wrapper script (torch's own guess is then wrong).
  TORCH_CUDA_ARCH_LIST      GPU archs, e.g. "8.0;9.0". Unset: the visible GPUs'
                            archs, or DEFAULT_CUDA_ARCHS when no GPU is visible.
  SPARSEMOM_NATIVE=1        add -march=native (a binary for this CPU only; the
                            default build is portable and picks AVX-512/AVX2
                            kernels at run time).
  MAX_JOBS                  parallel compile jobs (default: number of CPUs).

The package's metadata (name, version, dependencies, extras, the console script)
is in pyproject.toml; this file only declares the extension, which is compiled
against the torch that the building Python imports. Install torch first, then
`pip install --no-build-isolation -e .`: an isolated build (plain `pip install .`)
has no torch and stops with a message saying so.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

BUILD_HINT = "pip install --no-build-isolation -e .  (or: pip install --no-build-isolation .)"


def require_setuptools():
    """pyproject.toml's SPDX license field needs setuptools >= 77; an older one would fail with a
    schema error that does not say so (a --no-build-isolation build uses the environment's)."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        sys.exit(f"sparsemom_ext: building needs setuptools >= 77, and {sys.executable} has "
                 f"{setuptools.__version__}: pip install 'setuptools>=77', then build again")


def require_torch():
    """Import torch, or exit with the one line that says what to do."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        # pip's isolated build environments live in folders named pip-build-env-*.
        if any("pip-build-env-" in entry for entry in sys.path):
            sys.exit("sparsemom_ext: pip is building in an isolated environment, which cannot see your torch: "
                     f"install torch first, then build without build isolation: {BUILD_HINT}")
        sys.exit(f"sparsemom_ext: building needs torch, and {sys.executable} cannot import it ({exc}): "
                 f"install torch first (pip install torch), then build: {BUILD_HINT}")


# nvcc 13 compiles for sm_75 and newer. Used only when TORCH_CUDA_ARCH_LIST is
# unset and no GPU is visible: Turing, Ampere (A100, A10/RTX 30), Hopper
# (H100/H200), Blackwell (B200, RTX 50), with PTX of the newest for later GPUs.
# sm_86 code also runs on sm_89 (Ada), so 8.9 is not listed.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(folder):
    return folder is not None and (Path(folder) / "bin" / "nvcc").exists() and (
        Path(folder) / "include" / "cuda_runtime.h"
    ).exists()


def find_cuda_home():
    """The CUDA toolkit folder, or None.

    CUDA_HOME / CUDA_PATH win when set. Otherwise nvcc on PATH is followed
    through symlinks; when it is a wrapper script (its folder has no
    include/cuda_runtime.h), nvcc itself is asked where it lives (`--dryrun`
    prints `TOP=<toolkit>/bin/..`).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if not _is_toolkit(value):
                sys.exit(f"setup.py: {var}={value} has no bin/nvcc and include/cuda_runtime.h")
            return str(Path(value).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None if not _is_toolkit("/usr/local/cuda") else "/usr/local/cuda"
    guess = Path(os.path.realpath(nvcc)).parent.parent
    if _is_toolkit(guess):
        return str(guess)
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if match and _is_toolkit(os.path.normpath(match.group(1).strip())):
            return os.path.normpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def decide_cuda():
    """(with_cuda, cuda_home); exits with a message when forcing is impossible."""
    import torch

    if _flag("SPARSEMOM_FORCE_CPU"):
        return False, None
    cuda_home = find_cuda_home() if torch.version.cuda else None
    if _flag("SPARSEMOM_FORCE_CUDA"):
        if not torch.version.cuda:
            sys.exit("setup.py: SPARSEMOM_FORCE_CUDA=1 but the installed torch "
                     f"{torch.__version__} is a CPU-only build")
        if cuda_home is None:
            sys.exit("setup.py: SPARSEMOM_FORCE_CUDA=1 but no CUDA toolkit was found; "
                     "set CUDA_HOME to the folder with bin/nvcc and include/")
    return cuda_home is not None, cuda_home


def cuda_arch_tokens(arch_list):
    """'8.0;9.0+PTX' -> 'sm_80,sm_90,compute_90': what build_info() reports."""
    tokens = []
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        if not arch:
            continue
        digits = arch.replace("+PTX", "").replace(".", "")
        tokens.append(f"sm_{digits}")
        if arch.endswith("+PTX"):
            tokens.append(f"compute_{digits}")
    return ",".join(tokens)


def extensions():
    with_cuda, cuda_home = decide_cuda()
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported;
        # set its module global too in case something imported it earlier.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp"))
    # Strict IEEE arithmetic (no FMA contraction) so every ISA variant and the
    # CUDA kernels round identically; -fno-math-errno lets sqrt vectorise.
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
    if _flag("SPARSEMOM_NATIVE"):
        cxx.append("-march=native")
    ldflags = []
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is header code: without -fopenmp it runs serially.
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    macros = []
    if not with_cuda:
        print("sparsemom_ext: building CPU-only "
              f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda})")
        return [CppExtension("sparsemom_ext._C", sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)]

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        arch_list = DEFAULT_CUDA_ARCHS if torch.cuda.device_count() == 0 else None
    if arch_list is None:  # torch's choice: the visible GPUs
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    print(f"sparsemom_ext: building with CUDA kernels, CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={arch_list}")
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
    macros.append(("SPARSEMOM_WITH_CUDA", None))
    # For registration.cpp only: nvcc would split a -D value at its commas.
    cxx.append(f"-DSPARSEMOM_CUDA_ARCHS={cuda_arch_tokens(arch_list)}")
    nvcc = ["-O3", "--fmad=false"]
    return [CUDAExtension("sparsemom_ext._C", sources, define_macros=macros,
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=ldflags)]


def main():
    require_setuptools()
    require_torch()
    ext_modules = extensions()  # first: it sets CUDA_HOME before cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


if __name__ == "__main__":
    main()
