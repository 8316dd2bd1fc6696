#!/usr/bin/env bash
# One device call (about 6 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_mixed_lora.sh
# Session 14: where a mixed step's LoRA goes. Text generation's non-decode steps carry ~244 prefill tokens among
# 31 decodes and cost 2.2 ms more with distinct adapters than without (1.7 ms identical), against 0.8 / 0.24 ms in
# decode steps. The mixed graph (a 256-token chunk among 31 decodes) traced under each LoRA-overlap arrangement;
# then batch 64 end to end with split_by_capacity_max = 64 (the new default).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 300 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical none --mixed-chunk 256 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/profile_step.log"
sed -n '/span_us/,$p' "$OUT/profile_step.log"
timeout 240 python3 -m benchmarks.bench_textgen_lora --system punica --batch-size 64 --num-requests 1000 \
  --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -5
