#!/usr/bin/env bash
# The next device call (about 9 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the GPU test tier; 2. the batch-32 distinct decode graph with hybrid work lists in decode graphs too
# (hybrid_graphs=1, which bench_lora_chain found 25 us a layer faster for distinct LoRA alone) under each
# LoRA-overlap arrangement; 3. batch-32 text generation A/Bs: the defaults, hybrid_graphs=1, hybrid_graphs=1
# with the shrink-only overlap; 4. the batch-64 row of the issue-4 table. Each part writes as it goes.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct --steps 10 --out-dir "$OUT" \
  --sgmv-tuning hybrid_graphs=1 2>&1 | grep -v -i warn > "$OUT/profile_step.log"
tail -14 "$OUT/profile_step.log"
textgen() {
  python3 -m benchmarks.bench_textgen_lora --system punica --batch-size 32 --num-requests 256 --max-output 128 \
    --warmup-requests 32 --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -5
}
textgen
textgen --sgmv-tuning hybrid_graphs=1
textgen --sgmv-tuning hybrid_graphs=1 --lora-overlap shrink
python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 64 --num-requests 1000 \
  --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -7
