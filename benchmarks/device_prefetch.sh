#!/usr/bin/env bash
# One device call (about 9 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_prefetch.sh
# Session 19: SGMV programs ask L2 for their weights before the PDL wait (TUNING["prefetch_weights"]). The GPU
# tier (with the bitwise test of prefetch on against off); the issue-3 target table under each; the batch-32
# decode graph and a 480-token mixed graph recaptured under each, the defaults first and last.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
source benchmarks/gpu_tier.sh
for knobs in "" prefetch_weights=1; do
  echo "bench_sgmv --quick ${knobs:-defaults}"
  timeout 90 python3 -m benchmarks.bench_sgmv --quick --reps 40 --out-dir "$OUT" ${knobs:+--sgmv-tuning $knobs} 2>&1 \
    | grep -v -i warn | tail -7
done
timeout 130 python3 -m benchmarks.profile_step --graph-only --batch-size 32 --popularity distinct skewed identical \
  --out-dir "$OUT" --knobs "" prefetch_weights=1 "" 2>&1 | grep -v -i warn | tail -6
timeout 130 python3 -m benchmarks.profile_step --mixed-only --batch-size 32 --context 1100 --mixed-chunk 480 \
  --steps 5 --popularity distinct identical --out-dir "$OUT" --knobs "" prefetch_weights=1 "" 2>&1 \
  | grep -v -i warn | grep "mixed_graph_ms"
