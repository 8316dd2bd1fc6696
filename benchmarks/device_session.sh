#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Then benchmarks/device_table.sh and benchmarks/device_batches.sh for the tables of record.
# Session 9 ran it first: the GPU tier on the restructured SGMV kernels, the chain with the persistent walk at
# 0/4/8/16 programs per SM (now in device_persistent.sh), and text generation at batch 32 with and without.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 170 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
for args in "--batch-size 32 128 --chunk 256" "--batch-size 32 128"; do
  timeout 100 python3 -m benchmarks.bench_lora_chain $args --padded --tilings hybrid --popularity distinct uniform \
    skewed identical --variants persistent --out-dir "$OUT" 2>&1 | grep -v -i warn | grep "^{\|^ *[0-9]"
done
for tuning in "shrink_persistent=0 expand_persistent=0" "shrink_persistent=8 expand_persistent=8"; do
  timeout 120 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct skewed identical \
    --batch-size 32 128 --num-requests 512 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -7
done
