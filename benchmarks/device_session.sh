#!/usr/bin/env bash
# One device call (about 5 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 17: the GPU tier, then what structured output costs a batch on the GPU now that a constrained request's
# mask is made while its next step's model runs (bench_json_mode --random-7b, at 32 and 128 requests).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
source benchmarks/gpu_tier.sh
for n in 32 128; do
  timeout 200 python3 -m benchmarks.bench_json_mode --random-7b --requests $n --max-tokens 64 --repeats 2 \
    --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -7
done
