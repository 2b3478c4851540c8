#!/usr/bin/env bash
# GPU check (docs/benchmarks.md, "GPU check"): on one CUDA device with NCCL, runs the
# quickstart for 100 steps through the deepspeed launcher, ZeRO 0-3 equality in bf16 and
# fp16, AGVM's statistics on the device against the fused CPU kernel, and Faster R-CNN
# R50-FPN training throughput; one PASS/FAIL line per check, JSON to $1 or $OUT/gpu_check.json.
# Budget: 8 minutes. Without a CUDA device: one line on stdout and exit code 2.
#
#   bash bench/gpu_check.sh [OUT.json]
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); nothing run"
    exit 2
fi
export DS_ACCELERATOR=cuda
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}   # one device: world size 1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export PYTHONWARNINGS=ignore
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"      # the launcher of this venv
JSON=${1:-${OUT:-.}/gpu_check.json}
exec timeout --kill-after=20 480 "$PY" bench/gpu_check.py --device cuda --out "$JSON"
