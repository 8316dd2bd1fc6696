#!/usr/bin/env bash
# One device call: the batch-32 decode graph's replay (the decode step's device time) under SGMV launch knobs that
# change how many programs the LoRA kernels launch beside the GEMMs, defaults first and last (drift). Shared
# adapters (skewed, identical) run the sparse decode graphs, whose expand walks its items on a fixed grid.
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_decode_knobs.sh
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
for tuning in "" "expand_persistent=4" "expand_persistent=2" "shrink_waves=1" "expand_block_n=256" ""; do
  echo "== ${tuning:-defaults}"
  timeout 90 python3 -m benchmarks.profile_step --graph-only --batch-size 32 --popularity distinct skewed identical \
    --out-dir "$OUT" ${tuning:+--sgmv-tuning $tuning} 2>&1 | grep -v -i warn | grep -A4 "graph_replay_ms"
done
