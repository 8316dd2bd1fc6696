#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Then benchmarks/device_table.sh and benchmarks/device_batches.sh for the tables of record.
# Session 12 left the LoRA of mixed steps as the larger part of what adapters add besides decode (distinct 2.0 s,
# identical 1.6 s more than the backbone over the batch-32 table's mixed steps). This call: the GPU tier, where a
# mixed step's time goes at batch 32 (kernels of its graph, each popularity), and text generation at batch 32
# with the persistent walk in mixed graphs (on only from 128 sequences: persistent_min_batch) against without.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 120 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 170 python3 -m benchmarks.profile_step --batch-size 32 --context 400 --popularity distinct identical none \
  --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -80 > "$OUT/profile_step.log"
grep -A14 "mixed_graph_kernels" "$OUT/profile_step.log" | head -50
for tuning in "persistent_min_batch=128" "persistent_min_batch=32"; do
  timeout 120 python3 -m benchmarks.bench_textgen_lora --system punica --popularity distinct identical \
    --batch-size 32 --num-requests 256 --max-output 96 --warmup-requests 32 --out-dir "$OUT" \
    --sgmv-tuning $tuning 2>&1 | grep -v -i warn | tail -3
done
