#!/usr/bin/env bash
# Sets up a development environment from nothing, idempotently, with the pip and
# setuptools that a Python 3.10-3.13 venv brings (pip 23.0.1 on 3.10 included):
#   1. a virtual environment in $VENV (default .venv) made by $PYTHON (default python3,
#      3.10 or newer);
#   2. torch: $TORCH_SPEC (default torch==2.13.0) from pip's index, or from
#      $TORCH_INDEX_URL when set (e.g. https://download.pytorch.org/whl/cpu for a CPU
#      build; pip's default torch on Linux x86-64 is a CUDA build of several GB). A torch
#      already in the venv that satisfies $TORCH_SPEC is kept;
#   3. the build tools (setuptools >= 77, ninja, numpy), then the extension, built in
#      place against that torch: `pip install --no-build-isolation -e .[train,test]`,
#      which also brings the training command's extras (tqdm, matplotlib) and the test
#      tools (pytest, hypothesis, expecttest).
# CUDA kernels: compiled when torch is a CUDA build, nvcc is found and a GPU is visible
# (for that GPU's arch). Without a visible GPU the build is CPU-only unless
# SPARSEMOM_FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST is set (then setup.py's rules apply,
# see README.md "Build options"). MAX_JOBS (default: all cores) caps parallel compiles.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
PIP_OPTS=(-q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "setup.sh: sparsemom_ext needs Python 3.10 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
  }
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"

torch_index=()
[ -z "${TORCH_INDEX_URL:-}" ] || torch_index=(--index-url "$TORCH_INDEX_URL")
"$py" -m pip install "${PIP_OPTS[@]}" "${torch_index[@]}" "$TORCH_SPEC"
# With --no-build-isolation pip installs no build requirements: they must be here first
# (a 3.12+ venv has no setuptools, a 3.10/3.11 one setuptools 65, too old for pyproject.toml's
# license field).
"$py" -m pip install "${PIP_OPTS[@]}" "setuptools>=77" ninja numpy

if [ -z "${SPARSEMOM_FORCE_CPU:-}${SPARSEMOM_FORCE_CUDA:-}${TORCH_CUDA_ARCH_LIST:-}" ]; then
  read -r torch_cuda gpus < <("$py" -c 'import torch; print(torch.version.cuda or "none", torch.cuda.device_count())')
  if [ "$torch_cuda" != none ] && [ "$gpus" = 0 ]; then
    echo "setup.sh: torch is a CUDA $torch_cuda build but no GPU is visible: building the CPU kernels only" \
         "(SPARSEMOM_FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST to compile CUDA kernels anyway)"
    export SPARSEMOM_FORCE_CPU=1
  fi
fi

echo "setup.sh: building sparsemom_ext (a few minutes on 2 cores)"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install "${PIP_OPTS[@]}" --no-build-isolation -e ".[train,test]"
"$py" -c "import sparsemom_ext as sm; print('sparsemom_ext build:', sm.build_info())"
