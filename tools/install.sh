#!/usr/bin/env bash
# Create .venv (if missing) and install rainclf with its test extras.
# torch/torchvision are pinned to the builds this workplace's machines carry on disk
# (timm needs a torchvision that matches torch exactly).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RAINCLF_VENV:-.venv}"
PY="${PYTHON:-python3}"
LOG="$(mktemp -t rainclf-install.XXXXXX)"
pip_quiet() {  # pip's chatter goes to a log, shown only if the step fails
  if ! python -m pip install "$@" >>"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" | tail -n 40 >&2
    echo "rainclf install: 'pip install $*' failed (full log: $LOG)" >&2
    exit 1
  fi
}
if [ ! -x "$VENV/bin/python" ]; then
  echo "rainclf install: creating $VENV"
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
echo "rainclf install: torch 2.14.1 + torchvision 0.29.1, then rainclf[dev] (a few minutes the first time)"
pip_quiet -q --upgrade pip
pip_quiet -q "torch==2.14.1" "torchvision==0.29.1"
pip_quiet -q -e ".[dev]"
rm -f "$LOG"
python -c "import torch, torchvision, transformers, peft, timm, onnxruntime, rainclf; print('rainclf', rainclf.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
