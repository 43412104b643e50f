#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent GPU machine; writes logs under $OUT):
# build against the machine's torch, CUDA tests, benchmarks, compute-sanitizer, the example.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
stage() { echo "=== $1 ($(date +%T))"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$OUT/machine.txt"
stage build
timeout 240 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import gradvar_ext; print('backend', gradvar_ext.backend())"
stage "cuda tests"
timeout 200 $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log" | tail -15
stage "fused kernel benchmark"
timeout 90 $PY benchmarks/bench_fused_cuda.py 2>&1 | tee "$OUT/bench_fused.log" | tail -14
stage "variance benchmark"
timeout 150 $PY benchmarks/bench_variance.py --device cuda --quick --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_variance.log" | tail -30
stage "compute-sanitizer"
for tool in memcheck racecheck; do
  timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/sanitize_case.py > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool exit: $? ($(grep -c 'SUMMARY' "$OUT/sanitizer_$tool.log") summaries): $(grep 'SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
done
stage example
timeout 45 $PY examples/gradient_of_variance.py 2>&1 | tail -12
stage done
