#!/usr/bin/env bash
# One script for a CUDA machine (issue 15): the full-size random GLM-4.1V table, onnxruntime-gpu
# vs torch at equal precision, and the GPU tests, written as JSON into OUT_DIR. Meant to finish in
# under 8 minutes on one H100/H200-class GPU.
#
#     bash tools/gpu_check.sh [OUT_DIR]        # default: gpu-check-<date>
#
# Writes: bench_full_size.json    vision head, answer head, half depth, LoRA head, greedy,
#                                 constrained; batch 1 and 32; p50 latency, img/s, MFU
#         bench_constrained.json  two-pass vs one-prefill constrained scoring, batch 32
#         bench_onnx_gpu.json     onnxruntime-gpu (CUDA EP) vs torch bf16 and fp32 (fp32 graph: equal precision)
#         pytest_gpu.txt          pytest -m gpu
#         summary.json            exit status of every step
# STATUS (issue 15): UNRUN — no CUDA machine was lent to this task; nothing here has been
# executed on a GPU yet. Run it once and paste the table into the issue's note.
set -u
OUT="${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 RAINCLF_CACHE_DIR="${RAINCLF_CACHE_DIR:-$OUT/cache}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU; run this on a CUDA machine" >&2
    exit 2
fi
declare -A RC
step() {   # step NAME TIMEOUT_S CMD...: run with a time limit, keep going, record the status
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)" >&2
    timeout "$limit" "$@"; RC[$name]=$?
}
step full_size 240 "$PY" tools/bench.py --full-size-random --batch-sizes 1,32 --images 32 --calls 4 \
    --skip onnx --json "$OUT/bench_full_size.json"
step constrained 90 "$PY" tools/bench_constrained.py --full-size-random --batch 32 --calls 3 \
    --json "$OUT/bench_constrained.json"
step onnx_gpu 90 "$PY" tools/bench_onnx.py --gpu --json "$OUT/bench_onnx_gpu.json"
step pytest_gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ > "$OUT/pytest_gpu.txt" 2>&1
{
    echo "{"
    first=1
    for k in "${!RC[@]}"; do
        [ $first = 1 ] || echo ","
        printf '  "%s": %s' "$k" "${RC[$k]}"; first=0
    done
    echo; echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
