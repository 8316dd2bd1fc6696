#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 16: the GPU tier, then per-token (BGMV) expand tiles of [512, 16] (TUNING["bgmv_expand_tile"] 8192)
# against the old [128, 16] (2048): the decode graphs at batch 64, 128 and 256 over 128 adapters (per-token tiling:
# one or two tokens an adapter), and the target table (its Distinct rows tile per token).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 120 tests/ops tests/test_gpu_engine.py > "$OUT/gpu_tests.full" 2>&1
tail -3 "$OUT/gpu_tests.full" > "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.full" | head -20
tail -1 "$OUT/gpu_tests.log"
timeout 200 python3 -m benchmarks.bench_sgmv --quick --reps 40 --out-dir "$OUT" > "$OUT/sgmv_quick.log" 2>&1
echo "bench_sgmv rc $?"; grep -v -i warn "$OUT/sgmv_quick.log" | tail -12
timeout 300 python3 -m benchmarks.profile_step --graph-only --batch-size 64 128 256 --num-adapters 128 \
  --popularity distinct uniform --steps 20 --out-dir "$OUT" --knobs "" bgmv_expand_tile=2048 "" \
  > "$OUT/profile_knobs.log" 2>&1
echo "profile_step rc $?"; grep "graph_ms  defaults" "$OUT/profile_knobs.log"
