#!/usr/bin/env bash
# Creates .venv with torch 2.14.1 (a CUDA 13.0 build: with nvcc present the .cu kernels compile
# even without a GPU), builds the extension in place and registers the checkout in the venv.
# Usage: bash scripts/setup.sh        (PYTHON=python3.11 bash scripts/setup.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.14.1" ninja pytest numpy
.venv/bin/python -c "import setuptools" 2>/dev/null || "${pip[@]}" setuptools
# Ahead-of-time build into gradvar_ext/ (incremental: reruns take seconds).
.venv/bin/python setup.py -q build_ext --inplace
# Make `import gradvar_ext` find this checkout from anywhere (editable, nothing compiled again).
GRADVAR_EXT_SKIP_BUILD=1 "${pip[@]}" --no-deps -e .
.venv/bin/python -c "import gradvar_ext; print('gradvar_ext ready, backend:', gradvar_ext.backend())"
