#!/usr/bin/env bash
# One command for the GPU table: `prefixtune bench --suite scaling --device cuda` (CUDA-event
# timing, torch.cuda.max_memory_allocated peaks, SDPA flash/efficient kernels, bf16), written to
# docs/results/bench/gpu-scaling.json + .md + one log-log PNG per dimension.
# Usage: scripts/gpu-bench.sh [extra bench flags, e.g. --memory-budget-gb 40 --quick]
# On a machine without CUDA it stops at once with one clear error (--device cuda: no CUDA device).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
OUT="${OUT:-docs/results/bench}"
mkdir -p "$OUT"
exec "$PYTHON" -m prefixtune.cli.main bench --suite scaling --device cuda \
  --iters 3 --warmup 1 --point-budget-s 120 --threads 4 \
  --out "$OUT/gpu-scaling.json" "$@"
