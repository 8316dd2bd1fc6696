#!/usr/bin/env bash
# The issue-4 table at batch 32 (about 5 minutes on an H200): 1000 requests, outputs <= 256, with the defaults
# in the tree. Extra flags for bench_textgen_lora go after the script's name, e.g.
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_table.sh --triton-gemm-beside-lora
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 560 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -6
