#!/usr/bin/env bash
# One device call (about 10 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_final18.sh
# Session 18's last: the GPU tier (regex and choice masks on CUDA graphs among its new tests); whether steps of
# 129-512 tokens would rather write the delta first than run the LoRA on the side stream (batch 32, a 480-token
# chunk among 31 decodes, the defaults first and last); then the issue-4 table at batch 32 (device_table.sh's run).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
source benchmarks/gpu_tier.sh
timeout 150 python3 -m benchmarks.profile_step --mixed-only --batch-size 32 --context 1100 --mixed-chunk 480 \
  --steps 5 --popularity distinct identical --out-dir "$OUT" \
  --knobs "" SIDE_STREAM_MAX_TOKENS=0,DELTA_FIRST_MIN_TOKENS=0 SIDE_STREAM_MAX_TOKENS=0 "" 2>&1 \
  | grep -v -i warn > "$OUT/profile_delta_first_32.log"
grep "mixed_graph_ms  defaults" "$OUT/profile_delta_first_32.log"
timeout 420 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -8
