#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the GPU tier; 2. the decode graph at batch 32 per LoRA-overlap arrangement (profile_step); 3. the
# batch-32 table (device_table.sh: 1000 requests; extra flags go to bench_textgen_lora). Every step has a
# timeout. Session 6 ran its earlier form, which chose the table's overlap from step 2 ("delta" won).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
start=$SECONDS
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 150 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical --steps 10 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/profile_step.log"
grep -A3 "graph_replay_ms  graph_ms none" "$OUT/profile_step.log"
left=$((590 - (SECONDS - start)))
OUT=$OUT timeout $left bash benchmarks/device_table.sh "$@"
