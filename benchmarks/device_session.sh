#!/usr/bin/env bash
# One device call (about 6 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Next: decode graphs on hybrid work lists are on up to 32 sequences (TUNING hybrid_decode_max; session 8:
# batch 32 identical +3%, skewed +2.6%, distinct and uniform even; at 128 distinct and uniform lost 4%).
# Batch 64 was not measured: the GPU tier, then the decode graph and text generation at 64 with the lists on
# (hybrid_decode_max=64) against the defaults.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
for max in 32 64; do
  echo "== hybrid_decode_max=$max"
  timeout 120 python3 -m benchmarks.profile_step --graph-only --batch-size 64 --steps 10 \
    --popularity distinct uniform skewed identical none --out-dir "$OUT" --sgmv-tuning hybrid_decode_max=$max 2>&1 \
    | grep -v -i warn > "$OUT/profile_step_64_$max.log"
  tail -12 "$OUT/profile_step_64_$max.log" | cut -c1-60
  timeout 110 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct uniform skewed identical \
    --batch-size 64 --num-requests 512 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning hybrid_decode_max=$max 2>&1 | grep -v -i warn | tail -5
done
