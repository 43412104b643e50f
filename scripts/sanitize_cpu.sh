#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: builds a C++-only copy of
# the extension with -fsanitize=address,undefined in a scratch clone of HEAD, then runs the test
# suite against it with the sanitizer runtimes preloaded into Python (halt on the first report).
# (compute-sanitizer covers the CUDA kernels: scripts/gpu_check.sh.)
#   bash scripts/sanitize_cpu.sh [pytest args]     # default: tests -x; ~1 min build + ~8 min tests on 2 cores
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/gradvar_sanitize.XXXX)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/src"  # HEAD as committed
cd "$WORK/src"
echo "building a sanitized C++-only module in $WORK/src"
GRADVAR_EXT_NO_CUDA=1 CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g" \
  LDFLAGS="-fsanitize=address,undefined" MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 ||
  { tail -30 "$WORK/build.log"; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
PYTHONPATH=$PWD "$PY" -c "import gradvar_ext, sys; sys.exit(gradvar_ext.backend() != 'prebuilt')" ||
  { echo "the sanitized module did not load"; exit 1; }
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests -x -q)
# the JIT test compiles an unsanitized module of its own: left out
PYTHONPATH=$PWD "$PY" -m pytest -p no:cacheprovider --deselect tests/test_loader.py::test_jit_build_from_source_checkout \
  "${args[@]}"
