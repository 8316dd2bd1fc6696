#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 8: decode graphs tiled per token read a shared adapter once per token (identical: 32x the B tiles
# through L2 at batch 32, 128x at 128) and at batch 128 the main stream waits ~2.5 ms a step on the LoRA side
# stream (profile_step's lora_only_us). A/B: decode graphs on hybrid work lists (shared adapters' tokens in
# tensor-core row blocks) with segments of <= 3 tokens kept as single-token items (where hybrid lists lost to
# per-token tiling: uniform batches' 2-3 token segments padded to 32-row blocks).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
HYBRID="hybrid_decode_min=1 bgmv_max_seg=3"
for tuning in "" "$HYBRID"; do
  echo "== decode graphs, sgmv tuning: ${tuning:-defaults}"
  timeout 170 python3 -m benchmarks.profile_step --graph-only --batch-size 32 128 --steps 10 \
    --popularity distinct uniform skewed identical none --out-dir "$OUT" ${tuning:+--sgmv-tuning $tuning} 2>&1 \
    | grep -v -i warn > "$OUT/profile_step_${tuning:+hybrid}.log"
  tail -24 "$OUT/profile_step_${tuning:+hybrid}.log" | cut -c1-150
done
timeout 130 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct uniform skewed identical \
  --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 --out-dir "$OUT" --sgmv-tuning $HYBRID \
  2>&1 | grep -v -i warn | tail -5
timeout 50 python3 -m benchmarks.bench_textgen_lora --system punica --popularity skewed \
  --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -2
