#!/usr/bin/env bash
# The next device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the
# device (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the GPU tier (session 5's last kernels have not run on a GPU: split-K GEMM, rope_store_kv, the LoRA
# delta folded into rope_store_kv and silu_and_mul); 2. the decode GEMM's tile sweep with split K and deeper
# pipelines against cuBLAS, saving the winners ($OUT/gemm_config.json; copy them into ops/gemm.py if they
# hold); 3. batch-32 text generation with those winners: as shipped, --unfused (llama.FUSIONS off), and the
# base GEMM of steps with LoRA on the Triton GEMM (--triton-gemm-beside-lora: its grid leaves SMs to the
# LoRA's side stream, which cuBLAS does not). Then: benchmarks/device_table.sh. Every step has a timeout.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -8 "$OUT/gpu_tests.log"
timeout 240 python3 -m benchmarks.bench_gemm --batch-size 32 --budget-s 120 --save-config "$OUT/gemm_config.json" \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/gemm.log"
grep -v "^{" "$OUT/gemm.log" | tail -8
cfg=()
if [ -f "$OUT/gemm_config.json" ]; then cat "$OUT/gemm_config.json"; cfg=(--gemm-config "$OUT/gemm_config.json"); fi
for variant in "" --unfused --triton-gemm-beside-lora; do
  timeout 100 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct identical \
    --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 "${cfg[@]}" --out-dir "$OUT" $variant \
    2>&1 | grep -v -i warn | tail -4
done
