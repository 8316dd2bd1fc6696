#!/usr/bin/env bash
# One device call (about 9 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 13 changed the shrink's split K in decode graphs of <= 32 tokens (split_by_capacity_max), measured on the
# decode graph alone (-0.4 to -1.1% at batch 32). This call: the GPU tier, the batch-32 table of record end to end
# with it, and whether larger decode graphs (64, 128: sparse lists for shared adapters) gain from it too.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 100 python3 -m pytest -m gpu -q -n 8 --timeout 90 tests/ops tests/test_gpu_engine.py 2>&1 | tail -3 \
  > "$OUT/gpu_tests.log"
tail -1 "$OUT/gpu_tests.log"
timeout 120 python3 -m benchmarks.profile_step --graph-only --batch-size 64 128 --popularity distinct skewed identical \
  --out-dir "$OUT" --knobs "" split_by_capacity_max=256 "" 2>&1 | grep -v -i warn | grep "graph_ms"
timeout 350 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -6
