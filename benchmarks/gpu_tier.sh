#!/usr/bin/env bash
# The GPU tier, its log under $OUT (gpu_tests.full, and gpu_tests.log: the summary), failures and the summary on
# stdout. Sourced by the device_*.sh scripts that start with it.
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 120 tests/ops tests/test_gpu_engine.py > "$OUT/gpu_tests.full" 2>&1
tail -3 "$OUT/gpu_tests.full" > "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.full" | head -20
tail -1 "$OUT/gpu_tests.log"
