#!/usr/bin/env bash
# One device call's worth of GPU checks and A/B measurements (about 6 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the GPU test tier; 2. decode/mixed step profiles (with the LoRA-epilogue and side-stream A/Bs inside);
# 3. text generation at batch 32: backbone, punica, punica without LoRA epilogues, punica with hybrid work
# lists. Each part writes as it goes, so a run cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical --steps 20 --out-dir "$OUT" \
  2>&1 | grep -v -i warn > "$OUT/profile_step.log"
tail -4 "$OUT/profile_step.log"
textgen() {
  python3 -m benchmarks.bench_textgen_lora --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 \
    --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -6
}
textgen --system backbone punica
textgen --system punica --no-lora-epilogue
textgen --system punica --sgmv-tuning hybrid_graphs=1 hybrid_single_max=8
