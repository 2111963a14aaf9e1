#!/usr/bin/env bash
# What only a GPU shows, in < 8 minutes on one H100 (benchmarks/gpu_check.py says what and why).
#   bash benchmarks/gpu_check.sh          # on a CUDA machine; figures appended to benchmarks/RESULTS_GPU.md
#   bash benchmarks/gpu_check.sh --dry    # (or DRY=1) on the CPU, sizes shrunk: GPU-only parts skipped, with why
# Needs on the GPU machine: a CUDA torch, bitsandbytes, deepspeed (flash-attn optional); PY=python to pick one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
args=("$@")
if [ "${DRY:-0}" = 1 ]; then args+=(--dry); fi
# 470 s: the whole check stays under 8 minutes even if one part hangs
exec timeout 470 "$PY" benchmarks/gpu_check.py "${args[@]}"
