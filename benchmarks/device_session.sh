#!/usr/bin/env bash
# The next device call (about 9.5 minutes on an H200), results under $OUT. Set the revision here, not on the
# device (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the GPU tier (tests/ops/test_gemm.py's split-K cases have not run on a GPU); 2. the decode GEMM's tile
# sweep with split K and deeper pipelines against cuBLAS, saving the winners; 3. the issue-4 table at batch 32
# (1000 requests) with the defaults plus those winners. If a winner changes PLAIN_SHAPES, copy it into
# ops/gemm.py. Every step has a timeout.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -8 "$OUT/gpu_tests.log"
timeout 200 python3 -m benchmarks.bench_gemm --batch-size 32 --budget-s 150 --save-config "$OUT/gemm_config.json" \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/gemm.log"
grep -v "^{" "$OUT/gemm.log" | tail -8
cat "$OUT/gemm_config.json"
timeout 300 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 32 --num-requests 1000 \
  --max-output 256 --gemm-config "$OUT/gemm_config.json" --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -6
