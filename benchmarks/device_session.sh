#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Then benchmarks/device_table.sh and benchmarks/device_batches.sh for the tables of record.
# Session 10 adopted smaller SGMV tiles (list_block_m 16, max_block_k 256) on the chain's evidence (5-10% less
# LoRA time at decode, 10-12% less in mixed steps at 128 for distinct adapters) and measured them end to end at
# batch 32 only, where the side stream hides the difference. This call: the GPU tier, issue 3's SGMV target table
# (max_block_k also sets token mode's shrink tile: the Distinct rows), then text generation at batches 64 and 128
# with the earlier tiles against the defaults.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 120 python3 -m benchmarks.bench_sgmv --quick --reps 40 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -14
for tuning in "max_block_k=512 list_block_m=32" "list_block_m=16"; do
  timeout 200 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct uniform skewed identical \
    --batch-size 64 128 --num-requests 256 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -9
done
