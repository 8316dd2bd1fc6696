#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# 1. the GPU tier; 2. the decode graph at batch 32 per LoRA-overlap arrangement (profile_step), which picks
# the arrangement for 3. the batch-32 table (device_table.sh: 1000 requests) between "auto" and "delta" (all
# four LoRA deltas beside their GEMMs, each added by the kernel after it). Every step has a timeout.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
start=$SECONDS
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 150 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical --steps 10 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/profile_step.log"
grep -A4 "graph_replay_ms  graph_ms none" "$OUT/profile_step.log"
mode=$(python3 - "$OUT/profile_step.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
distinct = [r for r in rows if r["popularity"] == "distinct"]
print("delta" if distinct and distinct[-1]["graph_ms delta"] < distinct[-1]["graph_ms auto"] else "auto")
PY
)
echo "lora_overlap for the table: ${mode:-auto}"
left=$((590 - (SECONDS - start)))
OUT=$OUT timeout $left bash benchmarks/device_table.sh --lora-overlap "${mode:-auto}"
