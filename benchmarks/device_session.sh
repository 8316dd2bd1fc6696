#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 15's last call: the GPU tier at the revision submitted (the KV cache sized after a measured step, the
# scheduler's wait for shared prefix blocks), then the batch-32 table of record at that revision.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 100 tests/ops tests/test_gpu_engine.py > "$OUT/gpu_tests.full" 2>&1
tail -3 "$OUT/gpu_tests.full" > "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.full" | head -20
tail -1 "$OUT/gpu_tests.log"
timeout 400 bash benchmarks/device_table.sh
