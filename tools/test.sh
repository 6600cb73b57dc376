#!/usr/bin/env bash
# Install (into .venv) and run the whole offline test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. "${RAINCLF_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
python -m pytest -q -p no:cacheprovider "$@"
