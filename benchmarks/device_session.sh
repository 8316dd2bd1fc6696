#!/usr/bin/env bash
# The next device call (about 9 minutes on an H200), results under $OUT. Set the revision here, not on the
# device (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the fused projection's GPU tests (a hang would mean its ticket wait deadlocks: stop there); 2. its tile
# sweep and the per-projection / per-layer A/B against cuBLAS + SGMV (bench_lora_gemm); 3. the GPU tier;
# 4. batch-32 text generation with lora_overlap fused (the tiles of step 2) against auto.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
if ! timeout 240 python3 -m pytest -m gpu -q -n 8 tests/ops/test_lora_gemm.py > "$OUT/gpu_tests_lora_gemm.log" 2>&1; then
  tail -40 "$OUT/gpu_tests_lora_gemm.log"
  exit 1
fi
tail -2 "$OUT/gpu_tests_lora_gemm.log"
timeout 300 python3 -m benchmarks.bench_lora_gemm --batch-size 32 --budget-s 100 --out-dir "$OUT" \
  --save-config "$OUT/lora_gemm_config.json" 2>&1 | grep -v -i warn > "$OUT/lora_gemm.log"
grep -v "^{" "$OUT/lora_gemm.log" | tail -24
cat "$OUT/lora_gemm_config.json"
timeout 200 python3 -m pytest -m gpu -q -n 8 --durations=8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -30 > "$OUT/gpu_tests.log"
tail -12 "$OUT/gpu_tests.log"
textgen() {
  python3 -m benchmarks.bench_textgen_lora --system punica --batch-size 32 --num-requests 256 \
    --max-output 128 --warmup-requests 32 --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -5
}
textgen --lora-overlap fused --lora-gemm-config "$OUT/lora_gemm_config.json"
