#!/usr/bin/env bash
# lorafleet's GPU check: kernels against their references on fresh random inputs, then the fused operator
# against PEFT's mixed-adapter loop and the base GEMM, then 4 adapters trained on a LLaMA-3-8B-shaped random
# model in bf16 (tokens/s, MFU). One GPU (written for an H200); under 8 minutes. From the repository root:
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # CPU smoke run of the same code on tiny shapes
#
# Python: $PYTHON, else .venv/bin/python when present, else python3 (lorafleet is taken from src/ when it is
# not installed). With OUT set, the full log goes to $OUT/gpu_check.log next to gpu_check.json and
# gpu_check.md (the table); without it the numbers go to benchmarks/results/. Extra arguments go to
# benchmarks/gpu_check.py (--parts checks fused_op training, --budget-s SECONDS).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check.log"
fi
# The driver keeps its own budget (450 s by default); the timeout is the backstop of the 8-minute limit.
timeout 470 "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ]; then echo "gpu_check: stopped by the 470 s timeout" | tee -a "$LOG"; fi
exit "$status"
