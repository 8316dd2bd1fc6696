#!/usr/bin/env bash
# One device call (about 4 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_mixed_expand.sh [KNOB=VALUE[,KNOB=VALUE] ...]
# Planned in session 16 for the next: a large mixed step's LoRA (one 1024-token chunk among 127 decodes, batch 128,
# as text generation's steps with prefill at batch 128-256) takes 3.7 ms (one adapter) to 6.2 ms (128) of a 41 ms
# graph, its expand about 2.7x the bytes it reads and writes (textgen_NOTES.md, session 16). The mixed graph
# recaptured under the expand's launch knobs, the defaults first and last.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
if [ $# -eq 0 ]; then
  set -- expand_block_n=64 expand_block_n=256 expand_warps=8 expand_stages=1 expand_stages=3 expand_persistent=0 \
    expand_persistent=8 expand_persistent=32 expand_tiles=2
fi
timeout 500 python3 -m benchmarks.profile_step --mixed-only --batch-size 128 --num-adapters 128 --context 1100 \
  --mixed-chunk 1024 --steps 5 --popularity distinct identical --out-dir "$OUT" --knobs "" "$@" "" 2>&1 \
  | grep -v -i warn > "$OUT/profile_mixed_expand.log"
grep "mixed_graph_ms  defaults" "$OUT/profile_mixed_expand.log"
