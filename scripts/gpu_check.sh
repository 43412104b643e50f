#!/usr/bin/env bash
# Everything that needs a GPU, in one run on a lent GPU machine (logs and JSON under $OUT):
# build against the machine's torch, CUDA tests, the example; unless QUICK=1, also the fused-kernel
# benchmark, the variance benchmarks (jobs b and a) and a CNN batch-size sweep (with BackPACK if its
# wheels were carried in .whl/), and compute-sanitizer memcheck + racecheck on
# scripts/sanitize_case.py. Both parts together exceed one 10-minute device call: run them apart.
#   QUICK=1 OUT=... bash scripts/gpu_check.sh     # about 1.5 min on an H200 once started
# PART=core: build, tests, example, fused benchmark, sanitizers (the built module is copied to
# $OUT, so that a second call can carry it as gradvar_ext/_C.so); PART=bench: the model
# benchmarks only (no build when a carried gradvar_ext/_C.so loads). Default: both.
# TEST_FILTER="..." passes -k to pytest (e.g. only the fused-kernel tests after a kernel change);
# KERNEL_CHECKS=0 skips the fused-kernel benchmark and compute-sanitizer (when no .cu changed);
# BENCH_SECTIONS="ratios breakdown" limits that benchmark to those tables;
# SANITIZE=0 skips only compute-sanitizer. WORKLOADS="cnn seq" limits the variance benchmarks to
# those workloads (default: all six), METHODS="..." to those methods; SKIP_JOB_A=1 skips job (a);
# BENCH_ROUNDS=3 runs job (b) in 3 rotating rounds (one round of fresh processes is noisy on a GPU).
# NCU=1 adds Nsight Compute on the tensor-core kernel (scripts/ncu_case.py) after the fused benchmark;
# NCU_CASES="implicit gemm" picks its cases; PROFILE_WORKLOADS="cnn" and PROFILE_METHODS="gradvar
# gradvar-strided torch.func" set the profile's; PROFILE_MEMORY=1 adds what is alive at each
# profiled call's peak (CUDA allocator history); SKIP_JOB_B=1 ends after the profile.
# WSCAP_MIB=16 adds job (b) on the CNN with cuDNN's workspaces capped (CUDNN_CONV_WSCAP_DBG=16;
# WSCAP_WORKLOADS / WSCAP_METHODS: which; default floor gradvar gradvar-pytorch-conv torch.func).
# On the H200's PyTorch 2.11 (twenty-fourth session) the cap moved no method's peak.
# SKIP_PROFILE=1 skips the profile of job (b) (90 s), SKIP_SWEEP=1 the CNN sweep (~90 s); the sweep runs before job (a), so that a
# call cut short loses job (a) first. CONV_ALGOS=1 adds the two conv algorithms' timing (measured: unfold wins on CUDA).
# On an H100 (thirtieth session, 790 s of device time in three calls): PART=core KERNEL_CHECKS=0 with a
# TEST_FILTER of 16 tests, build 33 s, tests 24 s, example 6 s; PART=bench, the CNN's profile of two
# methods with --memory 11 s and job (b) on the CNN, 6 methods x 3 rounds, 129 s; job (b) on all six
# workloads, 7 methods, one round: 279 s; the sweep does not fit after a 3-round job (b) of two workloads.
# On an H100 (twenty-eighth session, PART=core BENCH_SECTIONS="ratios budgets": 484 s): build 26 s,
# the CUDA tests 336 s (550 + 1 skipped, 6 workers), tensor-core tests 33 s, example 6 s, ratios +
# budgets 15 s, sanitizers 52 s; PART=bench (a JIT build, then the build, 66 s in all, the profile of one method with
# --memory 11 s, job (b) on the CNN with 6 methods x 2 rounds 98 s): 183 s.
# On an H200 (twenty-fourth session, PART=core with sanitizers: 491 s): build 28 s, the CUDA
# tests 333 s (534 tests, 6 workers), the tensor-core tests 35 s, example 6 s, ratios + breakdown
# 13 s, sanitizers 57 s; PART=bench with the profile (--memory), job (b) on the CNN (7 methods)
# and WSCAP_MIB: 100 s. A device start took ~35 s.
# On an H200 (fourteenth session, SKIP_PROFILE=1 SKIP_SWEEP=1 SKIP_JOB_A=1 WORKLOADS="cnn seq": 388 s
# in all): build 36 s, CUDA tests 135 s (300 tests in 6 pytest-xdist workers; 14 workers were
# slower: 295 of 325 in 140 s), the tensor-core tests 36 s, example 5 s, fused benchmark ~30 s,
# sanitizers 41 s, job (b) cnn + seq 103 s. On an H100 (eighth session): build 33 s, CUDA tests
# 190 s (243 tests, one process), fused benchmark 12 s, sanitizers 44 s,
# job (b) ~290 s (48 fresh processes), the sweep ~90 s: PART=core ~5 min; for one 10-min call
# after a Python-only change, KERNEL_CHECKS=0 SKIP_PROFILE=1 SKIP_SWEEP=1 (core, job b; job a if time).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
stage() { echo "=== $1 ($(date +%T))"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch; print(torch.__version__)"; } \
  2>&1 | tee "$OUT/machine.txt"
PART=${PART:-all}
stage build
# (loading the carried module alone: importing gradvar_ext without one would JIT-build first)
if [ "$PART" = bench ] && $PY -c "import glob, torch; torch.ops.load_library(glob.glob('gradvar_ext/_C*.so')[0])" 2>/dev/null; then
  echo "using the carried prebuilt module"
else
  timeout 200 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; tail -30 "$OUT/build.log"; exit 1; }
  cp gradvar_ext/_C*.so "$OUT/" 2>/dev/null
fi
# pytest-xdist (on the GPU image): the CUDA tests are host-bound (gradcheck's many small launches;
# 437 took 244 s on the nineteenth session's H100 with 6 workers; 533 since the twentieth's shifted
# and sliced tests, hence 330 s; ~560 since the twenty-first and twenty-second sessions' tests: 360 s);
# 6 worker processes sharing the GPU took 135 s on an H200 (one process: ~235 s at the eighth
# session's rate on an H100).
# `timeout` signals its whole process group: the workers too.
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-6}"
if [ "$PART" != bench ]; then
  stage "cuda tests ${XDIST:+(pytest $XDIST)}"
  if [ -n "${TEST_FILTER:-}" ]; then
    timeout 280 $PY -m pytest tests/test_cuda.py $XDIST -v --tb=short -p no:cacheprovider -k "$TEST_FILTER" 2>&1 |
      tee "$OUT/test_cuda.log" | tail -8
  else  # the tensor-core kernels in a process of their own: a fault there cannot spoil the rest
    # (-v: every test's verdict is in the log as it comes, even if a timeout ends the run)
    NEW_KERNELS="tensor_cores or implicit or tf32x3"
    timeout 360 $PY -m pytest tests/test_cuda.py $XDIST -v --tb=short -p no:cacheprovider -k "not ($NEW_KERNELS)" 2>&1 |
      tee "$OUT/test_cuda.log" | tail -8
    stage "cuda tests of the tensor-core kernels (cp.async pipeline, DMMA, implicit patches)"
    timeout 120 $PY -m pytest tests/test_cuda.py $XDIST -v --tb=short -p no:cacheprovider -k "$NEW_KERNELS" 2>&1 |
      tee "$OUT/test_cuda_tensor_cores.log" | tail -8
    # failed: the fused benchmark leaves them out (a faulting kernel would end it, and its other tables)
    [ "${PIPESTATUS[0]}" = 0 ] || export GRADVAR_BENCH_SKIP_TENSOR_CORES=1
  fi
  stage example
  timeout 60 $PY examples/gradient_of_variance.py > "$OUT/example.log" 2>&1
  echo "example exit $?"; grep -E "^\[|same\?|all checks|FAILED" "$OUT/example.log" | tail -16
  [ "${QUICK:-0}" = 1 ] && { stage done; exit 0; }
fi
if [ "$PART" != bench ] && [ "${KERNEL_CHECKS:-1}" = 1 ]; then
  stage "fused kernel benchmark"
  timeout 180 $PY benchmarks/bench_fused_cuda.py ${BENCH_SECTIONS:+--sections $BENCH_SECTIONS} 2>&1 | tee "$OUT/bench_fused.log" | tail -24
  if [ "${SANITIZE:-1}" = 1 ]; then
    stage "compute-sanitizer"
    for tool in memcheck racecheck; do
      timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/sanitize_case.py > "$OUT/sanitizer_$tool.log" 2>&1
      echo "$tool exit: $?: $(grep 'SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
    done
  fi
fi
if [ "${NCU:-0}" = 1 ]; then  # Nsight Compute: why the tensor-core kernel runs below cuBLAS's rate
  stage "nsight compute: the tensor-core moments kernel (implicit patches, the walk) and cuBLAS's GEMM"
  for case in ${NCU_CASES:-implicit walk gemm}; do
    kernel=fused_moments_mma; [ $case = gemm ] && kernel='gemm|xmma|cutlass'
    timeout 90 ncu --kernel-name "regex:$kernel" --launch-count 1 --clock-control none --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
      --section Occupancy --section LaunchStats $PY scripts/ncu_case.py $case > "$OUT/ncu_$case.log" 2>&1
    echo "ncu $case exit $?"; grep -E "Duration|SM Busy|Memory Throughput|Registers Per|Achieved Occ" "$OUT/ncu_$case.log"
  done
fi
[ "$PART" = core ] && { stage done; exit 0; }
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  stage "where job (b) spends its time: kernels launched, costliest ops (gradvar vs torch.func)"
  timeout 90 $PY benchmarks/profile_job.py --device cuda --workloads ${PROFILE_WORKLOADS:-mlp cnn seq} \
    --methods ${PROFILE_METHODS:-gradvar torch.func} ${PROFILE_MEMORY:+--memory} > "$OUT/profile_job_b.log" 2>&1
  grep -E "^## " "$OUT/profile_job_b.log"
fi
[ "${SKIP_JOB_B:-0}" = 1 ] && { stage done; exit 0; }
stage "variance benchmark"
# gradvar-fused (GRADVAR_EXT_FUSED_CUDA=1) is the default's kernels on all-Linear models since the
# one-position default, and forced onto slow shapes elsewhere (bench_fused_cuda.py times those):
# the micro-batched total_variance takes its place (CNN, N = 64, on an H200: 100.6 MB, the least).
# METHODS="..." replaces the list (e.g. gradvar gradvar-micro-32 gradvar-micro-48 torch.func).
METHODS=${METHODS:-floor gradvar gradvar+grad gradvar-micro loop torch.func backpack opacus}
timeout 320 $PY benchmarks/bench_variance.py --device cuda --quick ${BENCH_ROUNDS:+--rounds $BENCH_ROUNDS} \
  ${WORKLOADS:+--workloads $WORKLOADS} --methods $METHODS \
  --json "$OUT/bench_cuda.json" 2>&1 |
  tee "$OUT/bench_variance.log" | tail -50
if [ -n "${WSCAP_MIB:-}" ]; then  # what part of each method's GPU peak is cuDNN's workspaces
  stage "job (b) with cuDNN's workspaces capped at $WSCAP_MIB MiB (CUDNN_CONV_WSCAP_DBG, read by PyTorch)"
  CUDNN_CONV_WSCAP_DBG=$WSCAP_MIB timeout 150 $PY benchmarks/bench_variance.py --device cuda --quick \
    --workloads ${WSCAP_WORKLOADS:-cnn} --methods ${WSCAP_METHODS:-floor gradvar gradvar-pytorch-conv torch.func} \
    --json "$OUT/bench_wscap.json" 2>&1 | tee "$OUT/bench_wscap.log" | tail -10
fi
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
  stage "cnn batch-size sweep"
  # two batch sizes x four methods (micro-batches of 16 are launch-bound on a GPU: also of 128)
  timeout 150 $PY benchmarks/bench_variance.py --device cuda --quick --workloads cnn-16 cnn-512 \
    --methods gradvar gradvar-micro gradvar-micro-128 torch.func --json "$OUT/bench_sweep.json" 2>&1 |
    tee "$OUT/bench_sweep.log" | tail -16
fi
if [ "${SKIP_JOB_A:-0}" != 1 ]; then
  stage "variance benchmark, job a (the variance only)"
  timeout 200 $PY benchmarks/bench_variance.py --device cuda --quick --job a ${WORKLOADS:+--workloads $WORKLOADS} \
    --methods $METHODS --json "$OUT/bench_cuda_job_a.json" 2>&1 |
    tee "$OUT/bench_variance_job_a.log" | tail -45
fi
if [ "${CONV_ALGOS:-0}" = 1 ]; then
  stage "conv algorithms on CUDA (auto = unfold there; is grouped, i.e. cuDNN grouped convs, faster?)"
  for algo in unfold grouped; do
    GRADVAR_EXT_CONV_ALGORITHM=$algo timeout 50 $PY benchmarks/bench_variance.py --device cuda --quick \
      --workloads cnn cnn-256 --methods gradvar --json "$OUT/conv_$algo.json" 2>&1 | tee "$OUT/conv_$algo.log" | tail -3
  done
fi
stage done
