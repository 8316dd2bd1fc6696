#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Next: decode graphs on hybrid work lists are on up to 32 sequences (TUNING hybrid_decode_max; session 8:
# batch 32 identical +3%, skewed +2.6%, distinct and uniform even; at 128 skewed and identical gained 3%,
# distinct and uniform lost 4%). Batch 64 was not measured. Built after the last call: split_by_tokens=2 splits
# K for a decode graph's hybrid list as per-token tiling does (one row per token, not per 32-row block: at 128
# tokens, split 4 instead of 8), one suspect of the loss. The GPU tier, then text generation at 64 and 128 with
# the defaults, with the lists on at every size, and with both.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
for tuning in "hybrid_decode_max=32" "hybrid_decode_max=256" "hybrid_decode_max=256 split_by_tokens=2"; do
  echo "== $tuning"
  timeout 140 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct uniform skewed identical \
    --batch-size 64 128 --num-requests 512 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -9
done
