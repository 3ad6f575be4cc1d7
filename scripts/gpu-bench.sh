#!/usr/bin/env bash
# One command for the GPU table: `prefixtune bench --device cuda` over the scaling, train,
# generate, mfu (the GPU's measured bf16/fp32 matmul peak, so the train configs get MFU) and
# fused suites: CUDA-event timing, torch.cuda.max_memory_allocated peaks, SDPA flash/efficient
# kernels, bf16 autocast. Writes, in docs/results/bench/:
#   gpu.json + .md          train, generate and MFU (prefixtune vs PEFT, side by side)
#   gpu-scaling.json + .md  the scaling curves, + one log-log PNG per dimension
#   gpu-fused.json + .md    fused vs unfused frozen projections
# Usage: scripts/gpu-bench.sh [extra bench flags, e.g. --memory-budget-gb 40 --quick]
# On a machine without CUDA it stops at once with one clear error (--device cuda: no CUDA device).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
OUT="${OUT:-docs/results/bench}"
mkdir -p "$OUT"
exec "$PYTHON" -m prefixtune.cli.main bench --device cuda \
  --suite scaling train generate mfu fused \
  --iters 5 --warmup 1 --point-budget-s 120 --threads 4 \
  --out "$OUT/gpu.json" "$@"
