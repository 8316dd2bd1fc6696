#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 14 made mixed-step buckets finer (four per doubling: 287 tokens ran the 512-token graph) and measured
# batches 32, 64 and 128 (distinct, identical) with it; this call: the GPU tier (min_p and repetition_penalty on
# CUDA, the capture log), then the rest of the batch table (128: uniform, skewed; 256: all), whose rows now also
# carry how many graphs were captured, in how long, and their device memory.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 100 python3 -m pytest -m gpu -q -n 8 --timeout 90 tests/ops tests/test_gpu_engine.py 2>&1 | tail -3 \
  > "$OUT/gpu_tests.log"
tail -1 "$OUT/gpu_tests.log"
timeout 120 python3 -m benchmarks.bench_textgen_lora --system punica --popularity uniform skewed --batch-size 128 \
  --num-requests 1000 --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -3
timeout 330 python3 -m benchmarks.bench_textgen_lora --system backbone punica --batch-size 256 \
  --num-requests 1000 --max-output 96 --warmup-requests 32 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -6
python3 - "$OUT/textgen_lora.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["system"], r["popularity"], r["batch"], "graphs", r.get("graphs"), "capture_s", r.get("capture_s"),
          "capture_MiB", r.get("capture_MiB"))
PY
