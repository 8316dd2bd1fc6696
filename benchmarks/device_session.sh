#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 13 changed the shrink's split K in decode graphs of <= 32 tokens (split_by_capacity_max), measured on
# the decode graph alone (-0.4 to -1.1% at batch 32). This call: the GPU tier; whether larger decode graphs (64,
# 128: sparse lists for shared adapters) gain from it too; text generation at batch 32 with it and without (0 = the
# old rule). Then benchmarks/device_table.sh for the table of record.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 100 python3 -m pytest -m gpu -q -n 8 --timeout 90 tests/ops tests/test_gpu_engine.py 2>&1 | tail -3 \
  > "$OUT/gpu_tests.log"
tail -1 "$OUT/gpu_tests.log"
timeout 120 python3 -m benchmarks.profile_step --graph-only --batch-size 64 128 --popularity distinct skewed identical \
  --out-dir "$OUT" --knobs "" split_by_capacity_max=256 "" 2>&1 | grep -v -i warn | grep "graph_ms"
for tuning in "split_by_capacity_max=32" "split_by_capacity_max=0" "split_by_capacity_max=32"; do
  timeout 130 python3 -m benchmarks.bench_textgen_lora --system punica --popularity skewed identical \
    --batch-size 32 --num-requests 256 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -3
done
