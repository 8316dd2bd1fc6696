#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_final.sh
# Session 17's last: the batch-32 decode graph under shrink_sum_after (its hybrid lists' single items take the
# single-token shrink; the defaults first and last), then the issue-4 table at batch 32 (device_table.sh's run).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m benchmarks.profile_step --graph-only --batch-size 32 --popularity distinct skewed identical \
  --out-dir "$OUT" --knobs "" shrink_sum_after=0 "" 2>&1 | grep -v -i warn | tail -3
timeout 450 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -8
