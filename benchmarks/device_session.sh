#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Then benchmarks/device_table.sh and benchmarks/device_batches.sh for the tables of record.
# Built after session 9's last device call, CPU-tested only (eager padded graphs against PEFT, buffer writes), off
# by default: the sparse decode graphs (TUNING["sparse_decode"]). Each decode bucket gets a second graph on a
# hybrid list that the expand walks (persistent), replayed by steps whose sequences mostly share adapters. In the
# chain (session 9) that list took decode LoRA at 128 from 108.8/97.8 to 84.7/45.2 us a layer (skewed/identical).
# This call: the GPU tier (with a sparse graph's replay against eager), then text generation with and without, and
# with sparse graphs beside per-token decode graphs of every size.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
# the third: shared steps on the sparse graphs, so the others can go back to per-token tiling at every size
for tuning in "sparse_decode=0" "sparse_decode=0.5" "sparse_decode=0.5 hybrid_decode_max=0"; do
  timeout 150 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct skewed identical \
    --batch-size 32 128 --num-requests 256 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -7
done
