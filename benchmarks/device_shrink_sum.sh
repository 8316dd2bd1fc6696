#!/usr/bin/env bash
# One device call (about 5 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_shrink_sum.sh
# Session 17: single-token shrink programs sum their products over k once after the loop
# (TUNING["shrink_sum_after"] = 1) instead of at every step (0). The GPU tier; the shrink alone under both on the
# issue's target cases; the target table; decode graphs at batch 128 and 256 over 128 adapters (per-token tiling)
# recaptured under both, the defaults first and last.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
source benchmarks/gpu_tier.sh
timeout 120 python3 -m benchmarks.bench_sgmv --tune --systems shrink --popularity distinct identical --reps 40 \
  --budget-s 100 --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/shrink_tune.log"
python3 - "$OUT/sgmv_tune.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["knobs"] in ({}, {"shrink_sum_after": 0}):
        print(r["h_out"], r["r"], r["tokens"], r["popularity"], r["knobs"], round(r["graph_us"], 1))
PY
timeout 100 python3 -m benchmarks.bench_sgmv --quick --reps 40 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -8
for b in 128 256; do
  timeout 150 python3 -m benchmarks.profile_step --graph-only --batch-size $b --num-adapters 128 \
    --popularity distinct uniform --out-dir "$OUT" --knobs "" shrink_sum_after=0 "" 2>&1 | grep -v -i warn | tail -3
done
