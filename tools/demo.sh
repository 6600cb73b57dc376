#!/usr/bin/env bash
# The main job, end to end, offline: install, fit on the bundled synthetic sample with the
# random-weight glm4v-tiny backbone, predict a folder, show the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. "${RAINCLF_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
OUT="${RAINCLF_DEMO_OUT:-runs/demo}"
rm -rf "$OUT"; mkdir -p "$OUT"
echo "== rainclf fit data/sample/train.jsonl -o $OUT/model --backbone glm4v-tiny"
rainclf fit data/sample/train.jsonl -o "$OUT/model" --backbone glm4v-tiny --cache-dir "$OUT/cache"
echo "== rainclf predict data/sample/predict --model $OUT/model -o $OUT/predictions.csv"
rainclf predict data/sample/predict --model "$OUT/model" -o "$OUT/predictions.csv" --cache-dir "$OUT/cache"
column -s, -t < "$OUT/predictions.csv" 2>/dev/null || cat "$OUT/predictions.csv"
echo
echo "(glm4v-tiny has RANDOM weights: these labels demonstrate the pipeline, not GLM-4V accuracy)"
