#!/usr/bin/env bash
# Set up a virtual environment in .venv with ComfyUI-Lens and its test tools.
# A torch that is already importable (e.g. a CUDA build) is kept; otherwise the
# CPU build torch==2.13.0 is installed, so CPU-only machines pull no CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
