#!/usr/bin/env bash
# One device call (about 6 minutes on an H200): the text-generation table at batches 64, 128 and 256 with the
# tree's defaults (session 8's rows at 6e4ec21e9c07 in textgen_NOTES.md). Results under $OUT.
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_batches.sh
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 470 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 64 128 256 \
  --num-requests 1000 --max-output 96 --warmup-requests 32 --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -16
