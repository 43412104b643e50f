#!/usr/bin/env bash
# Creates .venv with torch 2.14.1 (a CUDA 13.0 build: with nvcc present the .cu kernels compile
# even without a GPU), builds the extension in place (editable install) and installs test tools.
# Usage: bash scripts/setup.sh        (PYTHON=python3.11 bash scripts/setup.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" ninja pytest setuptools wheel
# No build isolation: the build imports the torch installed above instead of fetching another.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -c "import gradvar_ext; print('gradvar_ext ready, backend:', gradvar_ext.backend())"
