#!/usr/bin/env bash
# Session 9's A/B of the persistent SGMV walk (about 4 minutes on an H200): the GPU SGMV tier, then the LoRA chain
# padded as the graphs run it, with the walk off, as the defaults have it (mixed graphs of >= 128 sequences), and
# in every graph at 8/16/32 programs per SM. Results under $OUT.
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_persistent.sh
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 90 tests/ops/test_sgmv.py 2>&1 | tail -2 > "$OUT/gpu_tests_sgmv.log"
cat "$OUT/gpu_tests_sgmv.log"
for args in "--batch-size 32 128 --chunk 256" "--batch-size 32 128"; do
  timeout 100 python3 -m benchmarks.bench_lora_chain $args --padded --tilings hybrid --popularity distinct uniform \
    skewed identical --variants persistent --out-dir "$OUT" 2>&1 | grep -v -i warn | grep "^{\|^ *[0-9]"
done
