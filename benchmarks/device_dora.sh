#!/usr/bin/env bash
# One device call (about 5 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_dora.sh
# Session 20: the cost of DoRA adapters with the scale applied in the expand's own pass (fc77115): the batch-32
# decode graph of Llama-2-7B sizes (32 adapters, r = 16 on all seven projections), plain LoRA then DoRA, each in a
# process of its own (the DoRA one needs more than a minute to write and load its adapters).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
for flag in "" --dora; do
  echo "profile_step ${flag:-plain}"
  timeout 200 python3 -m benchmarks.profile_step --graph-only --batch-size 32 --num-adapters 32 \
    --popularity distinct identical --out-dir "$OUT" $flag 2>&1 | grep -v -i warn > "$OUT/profile_dora${flag:-_plain}.log"
  grep -A3 "graph_replay_ms" "$OUT/profile_dora${flag:-_plain}.log" | head -8
done
