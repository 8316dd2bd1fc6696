#!/usr/bin/env bash
# The next device call (about 5 minutes on an H200), results under $OUT. Set the revision here, not on the
# device (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the fused projection's GPU tests; 2. its per-projection / per-layer A/B against cuBLAS + SGMV with the
# tiles in ops/lora_gemm.py (bench_lora_gemm); 3. backbone text generation with the Triton GEMM on the shapes
# where it measured faster, and without; 4. the GPU tier without the LoRA-overlap engine test; 5. that test
# (it has the fused mode, which hung or ran past the tier's timeout twice). Every step has a timeout.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 50 python3 -m pytest -m gpu -q -n 8 tests/ops/test_lora_gemm.py > "$OUT/gpu_tests_lora_gemm.log" 2>&1
tail -3 "$OUT/gpu_tests_lora_gemm.log"
timeout 80 python3 -m benchmarks.bench_lora_gemm --batch-size 32 --budget-s 0 --out-dir "$OUT" 2>&1 \
  | grep -v -i warn > "$OUT/lora_gemm.log"
grep -v "^{" "$OUT/lora_gemm.log" | tail -24
for gemm in --triton-gemm --no-triton-gemm; do
  timeout 40 python3 -m benchmarks.bench_textgen_lora --system backbone --batch-size 32 --num-requests 128 \
    --max-output 128 --warmup-requests 32 --out-dir "$OUT" $gemm 2>&1 | grep -v -i warn | tail -2
done
timeout 80 python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py -k "not side_stream" 2>&1 \
  | tail -8 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 40 python3 -m pytest -m gpu -q tests/test_gpu_engine.py -k side_stream 2>&1 | tail -8 > "$OUT/gpu_tests_overlap.log"
tail -3 "$OUT/gpu_tests_overlap.log"
