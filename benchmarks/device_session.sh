#!/usr/bin/env bash
# The next device call (about 4 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the fused shrink + expand kernel's GPU tests; 2. a batch-32 decode step's LoRA alone as one graph:
# per-token tiling (decode graphs) with and without the fused kernel, and hybrid lists; 3. the batch-32
# distinct decode graph with the fused kernel under each LoRA-overlap arrangement. Each part writes as it goes.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops/test_sgmv.py -k fused 2>&1 | tail -8 > "$OUT/gpu_tests_fused.log"
tail -3 "$OUT/gpu_tests_fused.log"
python3 -m benchmarks.bench_lora_chain --batch-size 32 --variants fused --tilings token hybrid --budget-s 60 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/lora_chain_fused.log"
tail -20 "$OUT/lora_chain_fused.log"
python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct --steps 10 --out-dir "$OUT" \
  --sgmv-tuning fused_token=1 2>&1 | grep -v -i warn > "$OUT/profile_step_fused.log"
tail -12 "$OUT/profile_step_fused.log"
