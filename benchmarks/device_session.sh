#!/usr/bin/env bash
# One device call (about 9 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Planned at the end of session 15 for the next one: the GPU tier at a revision that has not run it (session 15's
# last GPU run was at ba02a8e: the prompt-logprob cap, num_cached_tokens, sparse_single_max and engine/memory.py
# came after), then the batch-256 comparison of 2-3 token segments as single items or as row blocks that
# session 15 ran out of device time for (benchmarks/device_sparse_single.sh).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 100 tests/ops tests/test_gpu_engine.py > "$OUT/gpu_tests.full" 2>&1
tail -3 "$OUT/gpu_tests.full" > "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.full" | head -20
tail -1 "$OUT/gpu_tests.log"
bash benchmarks/device_sparse_single.sh
