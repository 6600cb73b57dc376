#!/usr/bin/env bash
# Create .venv (if missing) and install rainclf with its test extras.
# torch/torchvision are pinned to the builds this workplace's machines carry on disk
# (timm needs a torchvision that matches torch exactly).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RAINCLF_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, torchvision, transformers, peft, timm, onnxruntime, rainclf; print('rainclf', rainclf.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
