#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Then benchmarks/device_table.sh and benchmarks/device_batches.sh for the tables of record: session 8's tables
# ran mixed graphs with 3-token single items, which its last chain measurements showed cost 21-45% of a mixed
# step's LoRA; mixed graphs are back to 1 (TUNING mixed_single_max). Decode graphs on hybrid work lists are on
# up to 32 sequences (hybrid_decode_max; batch 32: identical +3%, skewed +2.6%; at 128 skewed and identical
# gained 3%, distinct and uniform lost 4%); batch 64 was not measured. This call: the GPU tier, then text
# generation at 64 and 128 with the defaults and with the lists on at every size.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
for tuning in "hybrid_decode_max=32" "hybrid_decode_max=256"; do
  echo "== $tuning"
  timeout 170 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct uniform skewed identical \
    --batch-size 64 128 --num-requests 512 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -9
done
