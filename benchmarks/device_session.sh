#!/usr/bin/env bash
# One device call's worth of GPU checks and measurements (about 9 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the GPU test tier; 2. the SGMV tilings side by side; 3. decode/mixed step profiles with and without
# hybrid SGMV work lists; 4. text generation at batch 32 and 128, with and without them. Each part writes as it goes, so a run
# cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.bench_sgmv --work-lists --reps 40 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -30
for hybrid in 0 1; do
  python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical --steps 20 \
    --sgmv-tuning hybrid_graphs=$hybrid --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -4
done
for hybrid in 0 1; do
  systems=$([ $hybrid = 0 ] && echo "backbone punica" || echo punica)
  python3 -m benchmarks.bench_textgen_lora --system $systems --batch-size 32 128 --num-requests 256 \
    --max-output 128 --warmup-requests 32 --sgmv-tuning hybrid_graphs=$hybrid --out-dir "$OUT" 2>&1 \
    | grep -v -i warn | tail -11
done
