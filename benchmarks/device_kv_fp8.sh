#!/usr/bin/env bash
# Device calls for the KV cache in float8 e4m3 (kv_cache_dtype fp8) against the model's bf16, results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_fp8.sh tier fp8        # the GPU tier, then fp8 text generation
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_fp8.sh attention auto fp8   # kernel tests and bench_attention
#                                                                              # first, then both text generations
# (ATTN_KV="fp8": bench_attention of the fp8 pools only)
# Text generation: batch 32 (1000 requests, outputs <= 256; with "tier" also batch 128, outputs <= 96), backbone
# and adapters (distinct, identical). bench_attention: batch 32, contexts 400 and mixed, fp8 also with q's dots.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mode=${1:?tier or attention}
shift
mkdir -p "$OUT"
batches=("32 256")
if [ "$mode" = tier ]; then
  source benchmarks/gpu_tier.sh
  batches+=("128 96")
else
  timeout 120 python3 -m pytest -m gpu -q -n 8 tests/ops/test_kv_store.py tests/ops/test_attention.py \
    tests/ops/test_norm_rope.py > "$OUT/gpu_tests_kv.full" 2>&1
  grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests_kv.full" | head -20; tail -1 "$OUT/gpu_tests_kv.full"
  for kv in ${ATTN_KV:-auto fp8}; do
    timeout 150 python3 -m benchmarks.bench_attention --batch-size 32 --context 400 mixed --splits 0 \
      --kv-dtype $kv --out-dir "$OUT" > "$OUT/attention_$kv.log" 2>&1
    tail -6 "$OUT/attention_$kv.log"
  done
fi
for KV in "$@"; do
  for spec in "${batches[@]}"; do
    set -- $spec
    echo "bench_textgen_lora --kv-cache-dtype $KV --batch-size $1 --max-output $2"
    timeout 240 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct identical \
      --batch-size "$1" --num-requests 1000 --max-output "$2" --kv-cache-dtype "$KV" --out-dir "$OUT" 2>&1 \
      | grep -v -i warn > "$OUT/textgen_kv_${KV}_$1.log"
    tail -4 "$OUT/textgen_kv_${KV}_$1.log"
  done
done
