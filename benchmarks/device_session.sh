#!/usr/bin/env bash
# One device call (about 8 minutes on an H200), results under $OUT. Set the revision here, not on the device
# (its copy of .git can be stale):
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_session.sh
# Built in session 6 after its last device call, so not yet run on a GPU: the decode attention's
# longest-context-first program order (AttentionMeta.seq_order, cuda_graph.DECODE_ORDER) and the side-stream
# LoRA delta written by the expand without a zero-fill (layers.DELTA_OVERWRITE). This call: 1. the GPU tier;
# 2. bench_attention with and without the order; 3. batch-32 text generation A/Bs of both (256 requests);
# 4. the decode graph per LoRA-overlap arrangement, and a 4096-token prefill step with and without LoRA
# (text generation's non-decode steps took 26% of the batch-32 run and 41% of distinct's LoRA overhead).
# Then benchmarks/device_batches.sh, then benchmarks/device_table.sh for the table of record.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 --durations=5 tests/ops tests/test_gpu_engine.py 2>&1 | tail -12 \
  > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 90 python3 -m benchmarks.bench_attention --batch-size 32 64 --context 400 mixed 1024 --tiles 2 --splits 0 \
  --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/attention.log"
grep -A30 "^decode attention" "$OUT/attention.log"
for variant in "" --no-decode-order --no-delta-overwrite; do
  timeout 100 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct identical \
    --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 --out-dir "$OUT" $variant \
    2>&1 | grep -v -i warn | tail -4
done
timeout 140 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct none --steps 10 \
  --prefill 16 256 --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/profile_step.log"
grep -A3 "graph_replay_ms  graph_ms none" "$OUT/profile_step.log"
grep -A3 "prefill_tokens" "$OUT/profile_step.log"
