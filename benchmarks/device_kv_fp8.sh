#!/usr/bin/env bash
# Two device calls (about 7 minutes each on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_kv_fp8.sh fp8    # the GPU tier, then fp8 runs
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_kv_fp8.sh auto   # the same runs, 16-bit KV
# Session 20: the KV cache in float8 e4m3 (kv_cache_dtype fp8) against the model's bf16. Text generation at batch
# 32 (1000 requests, outputs <= 256) and 128 (outputs <= 96), backbone and adapters (distinct, identical).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
KV=${1:?fp8 or auto}
mkdir -p "$OUT"
if [ "$KV" = fp8 ]; then
  source benchmarks/gpu_tier.sh
fi
for spec in "32 256" "128 96"; do
  set -- $spec
  echo "bench_textgen_lora --kv-cache-dtype $KV --batch-size $1 --max-output $2"
  timeout 240 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct identical \
    --batch-size "$1" --num-requests 1000 --max-output "$2" --kv-cache-dtype "$KV" --out-dir "$OUT" 2>&1 \
    | grep -v -i warn > "$OUT/textgen_kv_${KV}_$1.log"
  tail -4 "$OUT/textgen_kv_${KV}_$1.log"
done
