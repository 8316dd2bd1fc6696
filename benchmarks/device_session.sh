#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Then benchmarks/device_table.sh and benchmarks/device_batches.sh for the tables of record (session 8's ran
# mixed graphs with 3-token single items, since put back to 1).
# Built after session 8's last device call, interpreter- and sm_90-compile-tested only: the persistent shrink and
# expand (TUNING shrink_persistent, expand_persistent, off). A graph's work list is padded to its bucket's worst case and each empty item
# launched a program per output tile: a mixed step's LoRA (256-token chunk among 127 decodes) took 192 us a
# layer padded against ~150-170 cut to the step (bench_lora_chain, session 8). This call: the GPU tier (now with
# the persistent expand in work-list tests and a graph replay that follows the item counts), the chain padded as
# the graphs run it with 0/4/8/16 persistent programs per SM, then text generation with 8.
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
