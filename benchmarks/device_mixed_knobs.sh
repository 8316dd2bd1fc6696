#!/usr/bin/env bash
# One device call: the batch-32 decode graph and mixed-step graph (a 128-token chunk among 31 decodes) recaptured
# under SGMV launch knobs, the defaults first and last (drift): what the LoRA of a mixed step costs per setting.
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_mixed_knobs.sh
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 330 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical none --out-dir "$OUT" \
  --knobs "" expand_block_n=256 expand_tiles=2 expand_warps=8 expand_stages=1 shrink_waves=1 shrink_waves=8 \
  split_by_tokens=0 max_split_k=4 shrink_block_k=256 "" 2>&1 | grep -v -i warn | tail -8
