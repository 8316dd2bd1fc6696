#!/usr/bin/env bash
# One device call: the batch-32 decode graph (a decode step's device time) recaptured under SGMV launch knobs that
# change how many programs the LoRA kernels run beside the GEMMs; the defaults first and last (drift). Shared
# adapters (skewed, identical) run the sparse decode graphs, whose expand walks its real items on a fixed grid.
#   PUNICA_GIT_REV=<rev from this machine> [BATCH=32] [ADAPTERS=n] [POPULARITY="distinct skewed identical"] \
#     bash benchmarks/device_decode_knobs.sh [KNOB=VALUE[,KNOB=VALUE] ...]
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
if [ $# -eq 0 ]; then
  set -- expand_persistent=4 expand_persistent=2 shrink_waves=1 expand_block_n=256
fi
# shellcheck disable=SC2086  # POPULARITY: one word a popularity
timeout 500 python3 -m benchmarks.profile_step --graph-only --batch-size "${BATCH:-32}" ${ADAPTERS:+--num-adapters $ADAPTERS} \
  --popularity ${POPULARITY:-distinct skewed identical} --out-dir "$OUT" --knobs "" "$@" "" 2>&1 | grep -v -i warn | tail -6
