#!/usr/bin/env bash
# A/B of launch knobs on the LoRA chain (about 5 minutes on an H200): the GPU SGMV tier, then the chain of 32 layers
# padded as the graphs run it, at batches 32 and 128, decode and a 256-token chunk among the decodes, over a named
# set of variants (bench_lora_chain.VARIANTS; default "persistent": session 9's walk). Results under $OUT.
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_chain.sh [variant set, e.g. occupancy]
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 90 tests/ops/test_sgmv.py 2>&1 | tail -2 > "$OUT/gpu_tests_sgmv.log"
cat "$OUT/gpu_tests_sgmv.log"
# decode graphs tile per token above TUNING["hybrid_decode_max"] sequences, on hybrid lists up to it
for args in "--batch-size 32 128 --chunk 256 --tilings hybrid" "--batch-size 32 128 --tilings token hybrid"; do
  timeout 200 python3 -m benchmarks.bench_lora_chain $args --padded --popularity distinct uniform \
    skewed identical --variants "${1:-persistent}" --out-dir "$OUT" 2>&1 | grep -v -i warn | grep "^{\|^ *[0-9]"
done
