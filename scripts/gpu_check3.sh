#!/usr/bin/env bash
# Short GPU pass after CPU-side changes to the conv path: build, CUDA tests, example.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
echo "=== build ($(date +%T))"
timeout 100 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; tail -30 "$OUT/build.log"; exit 1; }
echo "=== cuda tests ($(date +%T))"
timeout 110 $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log" | tail -8
echo "=== example ($(date +%T))"
timeout 30 $PY examples/gradient_of_variance.py > "$OUT/example.log" 2>&1; echo "example exit $?"; tail -2 "$OUT/example.log"
