#!/usr/bin/env bash
# Sets up a development environment from nothing, idempotently:
#   - a virtual environment in $VENV (default .venv) with Python 3.10+,
#   - torch ($TORCH_SPEC, default torch==2.13.0; e.g. TORCH_SPEC=torch==2.14.1 for a
#     CUDA build), numpy, tqdm (the training command's progress bars), matplotlib (its
#     --plot figures, tested) and the test tools,
#   - the sparsemom_ext extension built in place (pip install -e, no build isolation,
#     so the build uses the torch installed here instead of downloading another).
# CUDA kernels are compiled when that torch is a CUDA build and nvcc is found; see
# README.md "Build options" for SPARSEMOM_FORCE_CPU / SPARSEMOM_FORCE_CUDA and archs.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" numpy ninja tqdm \
  matplotlib pytest hypothesis expecttest
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  --no-build-isolation -e .
"$VENV/bin/python" -c "import sparsemom_ext as sm; print('sparsemom_ext build:', sm.build_info())"
