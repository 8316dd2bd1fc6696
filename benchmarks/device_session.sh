#!/usr/bin/env bash
# The next device call (about 10 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the GPU engine tests; 2. the LoRA chain of a batch-32 decode step alone, per tiling and launch knob
# (bench_lora_chain.py); 3. the issue-4 table at batch 32 (1000 requests, outputs <= 256) with the defaults.
# Each part writes as it goes, so a run cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.bench_lora_chain --batch-size 32 --budget-s 200 --out-dir "$OUT" 2>&1 | grep -v -i warn \
  > "$OUT/lora_chain.log"
tail -30 "$OUT/lora_chain.log"
python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -7
