#!/usr/bin/env bash
# The next device call (about 10 minutes on an H200), results under $OUT. Set the revision here, not on the
# device (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the GPU test tier (with the PDL bitwise test); 2. batch-32 step profiles: the decode graph with
# programmatic dependent launch flipped (ops/pdl.py), and the LoRA-overlap arrangements; 3. the decode step's
# LoRA alone in the decode graphs' per-token tiling: the launch-knob sweep, then the defaults with PDL; 4. batch-32 text generation, defaults vs --pdl; 5. batches 128 and 256 of
# the issue-4 table. Each part writes as it goes, so a run cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical none --steps 20 --out-dir "$OUT" \
  2>&1 | grep -v -i warn > "$OUT/profile_step.log"
tail -8 "$OUT/profile_step.log"
python3 -m benchmarks.bench_lora_chain --batch-size 32 --variants knobs --tilings token --budget-s 90 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/lora_chain_token.log"
tail -12 "$OUT/lora_chain_token.log"
python3 -m benchmarks.bench_lora_chain --batch-size 32 --variants defaults --tilings token --pdl \
  --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -3
textgen() {
  python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 256 \
    --max-output 128 --warmup-requests 32 --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -6
}
textgen
textgen --pdl
python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 128 256 --num-requests 1000 \
  --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -11
