#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a machine with CUDA, nvcc and a python3 that
# has a CUDA build of torch (no virtualenv is made: the machine's own torch is used).
#
#   bash scripts/gpu_check.sh [STAGE...]   # default: build test spmm optim training train
#
# build: compile the extension in place for this GPU's arch (TORCH_CUDA_ARCH_LIST, default
#        the visible GPU's); test: the whole suite (CUDA cases included); spmm, optim,
#        training: bench_spmm, bench_fused_optim and bench_training on cuda; train: a short
#        `sparsemom_ext.train --device cuda` run. Logs and JSON go to $LOG_DIR (default $OUT
#        if set, else build/gpu-check). A stage that fails is reported and the next one still
#        runs; the exit status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# -X faulthandler: a crash in native code still prints the Python stack.
PYX=("$PY" -X faulthandler)
LOG_DIR=${LOG_DIR:-${OUT:-build/gpu-check}}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(build test spmm optim training train)
failed=0
started=$SECONDS
run_stage() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  printf '\n=== %s  [%ss]\n' "$name" "$((SECONDS - started))"
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!!! stage $name failed (exit $rc)"; failed=$((failed + 1)); }
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

for stage in "${stages[@]}"; do
  case $stage in
    build)
      # The system compiler by default: built by another g++ on the PATH (seen: /opt/gcc on
      # a lent H100), the extension crashed in ops that throw or return a string (README,
      # Build options).
      run_stage build 900 env CC="${CC:-/usr/bin/gcc}" CXX="${CXX:-/usr/bin/g++}" SPARSEMOM_FORCE_CUDA=1 \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
      "$PY" -c 'import sparsemom_ext as sm; print(sm.build_info())' ;;
    test)
      # TEST_ARGS narrows the run, e.g. TEST_ARGS="-k cuda" for the CUDA cases alone.
      run_stage test 900 "$PY" -m pytest tests -q -p no:cacheprovider -rfE \
        -n "${TEST_WORKERS:-8}" ${TEST_ARGS:-} ;;
    spmm)
      run_stage bench_spmm 600 "${PYX[@]}" bench/bench_spmm.py --device cuda \
        --json "$LOG_DIR/bench_spmm_cuda.json" --plot "$LOG_DIR/bench_spmm_cuda.png" ;;
    optim)
      run_stage bench_fused_optim 300 "${PYX[@]}" bench/bench_fused_optim.py --device cuda \
        --shapes 4096x4096 1024x1024 --json "$LOG_DIR/bench_fused_optim_cuda.json" ;;
    training)
      run_stage bench_training 300 "${PYX[@]}" bench/bench_training.py --device cuda \
        --json "$LOG_DIR/bench_training_cuda.json" ;;
    train)
      run_stage train 300 "${PYX[@]}" -m sparsemom_ext.train --model lenet300 --density 0.05 \
        --device cuda --epochs 3 --no-progress --json "$LOG_DIR/train_cuda.json" ;;
    *) echo "unknown stage $stage (build test spmm optim training train)"; failed=$((failed + 1)) ;;
  esac
done
printf '\n=== done in %ss, %s stage(s) failed\n' "$((SECONDS - started))" "$failed"
exit "$failed"
