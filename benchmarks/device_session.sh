#!/usr/bin/env bash
# The GPU test tier, then the issue-4 text-generation table, in one device call (about 9 minutes on an H200);
# results under $OUT:   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# Each part writes as it goes, so a run cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -6
python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 64 128 256 --num-requests 1000 \
  --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -16
