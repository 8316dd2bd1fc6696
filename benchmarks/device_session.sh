#!/usr/bin/env bash
# One device call (about 5 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Planned at the end of session 16 for the next: the GPU tier (its JSON-mode test on CUDA graph steps is new, as
# are JSON-schema mode and the removal of sparse_single_max); what structured output costs a batch on the GPU
# (skipping a step against syncing: bench_json_mode --random-7b). The second call: the sweep of the expand's launch
# knobs on a 1111-token mixed step at batch 128 (benchmarks/device_mixed_expand.sh), the lead for large batches'
# steps with prefill (textgen_NOTES.md, session 16).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 120 tests/ops tests/test_gpu_engine.py > "$OUT/gpu_tests.full" 2>&1
tail -3 "$OUT/gpu_tests.full" > "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.full" | head -20
tail -1 "$OUT/gpu_tests.log"
timeout 240 python3 -m benchmarks.bench_json_mode --random-7b --requests 32 --max-tokens 64 --repeats 2 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -13
