#!/usr/bin/env bash
# Larger batches and mixed steps (about 9 minutes on an H200), results under $OUT: tensor-core row blocks for
# the LoRA of shared adapters in decode graphs of >= 64 sequences (sgmv TUNING["hybrid_decode_min"]; session 7:
# no gain in text generation, left off) against per-token tiling: the LoRA chain alone (bench_lora_chain), then
# text generation at batches 64 and 128, 512 requests, outputs <= 96.
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_batches.sh
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m benchmarks.bench_lora_chain --batch-size 64 128 --popularity distinct uniform identical \
  --tilings token hybrid --variants defaults --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -16
# the LoRA of a mixed step (a 128-token chunk among 31 decodes) as the mixed graphs launch it (work lists
# padded to the bucket's capacity) and unpadded, over the launch knobs: prefill-carrying steps hold 41% of
# distinct's LoRA overhead at batch 32
timeout 90 python3 -m benchmarks.bench_lora_chain --batch-size 32 --chunk 128 --padded --popularity distinct identical \
  --tilings hybrid --budget-s 60 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -14
for knob in hybrid_decode_min=0 hybrid_decode_min=64; do
  timeout 160 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct skewed identical \
    --batch-size 64 128 --num-requests 512 --max-output 96 --warmup-requests 32 --sgmv-tuning $knob \
    --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -7
done
