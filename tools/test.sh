#!/usr/bin/env bash
# Install (into .venv) and run the whole offline test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. "${RAINCLF_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
# -rs: every skip's reason is printed; tests/conftest.py fails the run on a skip not in its
# ALLOWED_SKIPS (root-only permission tests, GPU tests); GPU checks: python -m pytest -m gpu
python -m pytest -q -rs -p no:cacheprovider "$@"
