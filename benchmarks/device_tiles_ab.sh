#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_tiles_ab.sh
# Session 11: the host floor of an eager add-on call (bench_sgmv --profile-host), then the SGMV tiles of session 10
# end to end at batch 128 as a 2 x 2 (list_block_m 16/32, max_block_k 256/512), the new tiles first: session 11's
# first call ran the old tiles first and found them 1-2% faster at 128.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 90 python3 -m benchmarks.bench_sgmv --profile-host 2>&1 | grep -v -i warn | head -40
for tuning in "list_block_m=16" "max_block_k=512 list_block_m=32" "max_block_k=512" "list_block_m=32"; do
  echo "== $tuning"
  timeout 150 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct uniform skewed identical \
    --batch-size 128 --num-requests 256 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -5
done
