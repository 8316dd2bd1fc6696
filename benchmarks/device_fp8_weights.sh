#!/usr/bin/env bash
# Device calls for float8 projection weights (EngineConfig.quantization "fp8"), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_fp8_weights.sh gemm        # the GPU tier, then bench_gemm --fp8
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_fp8_weights.sh textgen Q.. # text generation, batch 32, per
#                                                                          # quantization Q (none, fp8); TIER=1:
#                                                                          # the GPU tier first
# bench_gemm: 32 layers of Llama-2-7B's projections per graph, tokens 1 / 8 / 32 (decode, tiles swept within
# GEMM_BUDGET_S, default 200, seconds) and 256 / 2048 (gemm.LARGE_CONFIG). Text generation: 1000 requests, outputs <= 256, backbone
# and the four popularities (POPULARITY to narrow them).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mode=${1:?gemm or textgen}
shift
mkdir -p "$OUT"
if [ "$mode" = gemm ]; then
  source benchmarks/gpu_tier.sh
  timeout 300 python3 -m benchmarks.bench_gemm --fp8 --batch-size 1 8 32 256 2048 --budget-s "${GEMM_BUDGET_S:-200}" \
    --out-dir "$OUT" > "$OUT/gemm_fp8.log" 2>&1
  tail -19 "$OUT/gemm_fp8.log"
  exit 0
fi
[ "${TIER:-0}" = 1 ] && source benchmarks/gpu_tier.sh
for Q in "$@"; do
  echo "bench_textgen_lora --quantization $Q --batch-size 32"
  timeout 280 python3 -m benchmarks.bench_textgen_lora --system backbone punica \
    --popularity ${POPULARITY:-distinct uniform skewed identical} --batch-size 32 --num-requests 1000 \
    --max-output 256 --quantization "$Q" --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/textgen_w_$Q.log"
  tail -7 "$OUT/textgen_w_$Q.log"
done
