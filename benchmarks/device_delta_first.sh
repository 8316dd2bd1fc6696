#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_delta_first.sh
# Session 18: large steps write the LoRA delta first and let the GEMM add to it (layers.DELTA_FIRST_MIN_TOKENS).
# The GPU tier, then the step of session 16's profile (one 1024-token chunk among 127 decodes, batch 128, as text
# generation's steps with prefill at batch 128-256) recaptured with the LoRA after the GEMM (the old order) and
# first, the defaults first and last; then an eager 4096-token prefill step (larger than any graph) the same way.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
source benchmarks/gpu_tier.sh
OLD=DELTA_FIRST_MIN_TOKENS=1000000
timeout 300 python3 -m benchmarks.profile_step --mixed-only --batch-size 128 --num-adapters 128 --context 1100 \
  --mixed-chunk 1024 --steps 5 --popularity distinct identical --out-dir "$OUT" --knobs "" $OLD "" 2>&1 \
  | grep -v -i warn > "$OUT/profile_delta_first_mixed.log"
grep "mixed_graph_ms  defaults" "$OUT/profile_delta_first_mixed.log"
timeout 240 python3 -m benchmarks.profile_step --batch-size 4 --num-adapters 8 --context 1100 --prefill 4 1024 \
  --steps 3 --popularity distinct identical --out-dir "$OUT" --knobs "" $OLD "" 2>&1 \
  | grep -v -i warn > "$OUT/profile_delta_first_prefill.log"
grep "prefill_.*_ms  defaults" "$OUT/profile_delta_first_prefill.log"
