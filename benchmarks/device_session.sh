#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Built in session 7 after its last device call, so not yet run on a GPU: CUDA graphs' work lists hold the
# base-model tokens as slot-0 items (SegmentPlan.items_cover), so the side-stream delta of a mixed step is
# written by the expand without the zero-fill that cost 128 fill kernels a step. This call: 1. the GPU tier;
# 2. batch-32 text generation with and without the overwrite, and with mixed steps' LoRA in line (256
# requests); 3. the mixed graph's kernels per popularity (profile_step); 4. the decode graph at batch 128,
# identical vs none. Then benchmarks/device_table.sh for the table of record.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
# last: mixed steps (>= 64 tokens) with their LoRA in line, decode (32 tokens) still beside the GEMM: in the
# mixed graph's profile the cuBLAS GEMMs took 1.1 ms more kernel time beside LoRA than alone
for variant in "" --no-delta-overwrite "--side-stream-max-tokens 32"; do
  timeout 100 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct uniform identical \
    --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 --out-dir "$OUT" $variant \
    2>&1 | grep -v -i warn | tail -5
done
timeout 140 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical none --steps 10 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/profile_step.log"
grep -A4 "popularity  step_ms" "$OUT/profile_step.log"
grep -A8 "mixed_graph_kernels" "$OUT/profile_step.log" | head -30
# batch 128: identical adapters cost ~2.2 ms a decode step over the backbone for ~0.14 ms of adapter bytes,
# and hybrid lists that cut the LoRA chain alone from 112 to 40 us a layer did not move it (session 7):
# where does that time go?
timeout 120 python3 -m benchmarks.profile_step --batch-size 128 --popularity identical none --steps 10 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/profile_step_128.log"
grep -A3 "popularity  graph_replay_ms" "$OUT/profile_step_128.log"
grep -A10 "graph_kernels" "$OUT/profile_step_128.log" | grep -v mixed | head -30
