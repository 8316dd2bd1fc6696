#!/usr/bin/env bash
# The next device call (about 9 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the GPU test tier; 2. batch-32 text generation, hybrid work lists in mixed graphs off and on
# (TUNING["hybrid_graphs"] 0 vs 2); 3. batches 128 and 256 of the issue-4 table (1000 requests, outputs <= 96),
# which the last call ran out of time for. Each part writes as it goes, so a run cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
for hybrid in 0 2; do
  python3 -m benchmarks.bench_textgen_lora --system punica --batch-size 32 --num-requests 256 --max-output 128 \
    --warmup-requests 32 --sgmv-tuning hybrid_graphs=$hybrid --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -5
done
python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 128 256 --num-requests 1000 \
  --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -11
