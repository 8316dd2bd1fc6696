#!/usr/bin/env bash
# One device call (about 6 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_qk_norm.sh
# Session 19: Qwen3's q/k norms inside rope_store_kv against kernels of their own (llama.FUSIONS["qk_norm"]). The GPU
# tier, then the batch-32 decode graph of a random Qwen3-8B (32 adapters, r = 16 on all seven projections) in three
# processes: fused, unfused, fused again.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
source benchmarks/gpu_tier.sh
for flag in --fuse-qk-norm --no-fuse-qk-norm --fuse-qk-norm; do
  echo "profile_step --shape qwen3-8b $flag"
  timeout 150 python3 -m benchmarks.profile_step --graph-only --shape qwen3-8b --batch-size 32 --num-adapters 32 \
    --popularity distinct none --out-dir "$OUT" $flag 2>&1 | grep -v -i warn > "$OUT/profile_qk_norm$flag.log"
  grep -A3 "graph_replay_ms" "$OUT/profile_qk_norm$flag.log" | head -4
done
