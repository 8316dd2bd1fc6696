#!/usr/bin/env bash
# One device call (about 5 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Session 15: the engine sizes the KV cache after the adapter slots and a measured largest step; the benchmark's
# batch-256 run ran out of memory because its punica engine was built while the backbone's, held by a stray
# reference to its graph runner, still kept its KV pool. This call: the GPU engine tests, then batch 256.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 100 tests/test_gpu_engine.py > "$OUT/gpu_tests.full" 2>&1
tail -3 "$OUT/gpu_tests.full" > "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests.full" | head -20
tail -1 "$OUT/gpu_tests.log"
run() {  # batch, timeout, systems and popularities...
  local batch=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m benchmarks.bench_textgen_lora --batch-size "$batch" --num-requests 1000 \
    --max-output 96 --warmup-requests 32 --out-dir "$OUT" "$@" > "$OUT/textgen_$batch.log" 2>&1
  echo "batch $batch rc $?"
  grep -E "Error|error" "$OUT/textgen_$batch.log" | grep -v -i warn | tail -8
}
run 256 420 --system backbone punica
python3 - "$OUT/textgen_lora.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["system"], r["popularity"], r["batch"], r["tok_per_s"], r["decode_step_ms"], r["floor_ratio"], "graphs",
          r.get("graphs"), "capture_s", r.get("capture_s"), "capture_MiB", r.get("capture_MiB"), "kv_blocks",
          r.get("kv_blocks"), "reserve_MiB", r.get("step_reserve_MiB"))
PY
