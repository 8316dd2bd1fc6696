#!/usr/bin/env bash
# The next device call (about 10 minutes on an H200), results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_session.sh
# 1. the GPU test tier; 2. batch-32 step profiles: the decode graph under each LoRA-overlap arrangement (whole
# delta or shrink only on the side stream, stream priority 0 or -1), each graph's span split into LoRA-only /
# base-only / both / idle time (trace_overlap.py); 3. batch-32 text generation A/Bs of those arrangements and of
# hybrid work lists in mixed graphs (hybrid_graphs=2). Each part writes as it goes, so a run cut short keeps
# what it measured.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
python3 -m pytest -m gpu -q -n 8 tests/ops tests/test_gpu_engine.py 2>&1 | tail -20 > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct identical --steps 20 --out-dir "$OUT" \
  2>&1 | grep -v -i warn > "$OUT/profile_step.log"
tail -24 "$OUT/profile_step.log"
textgen() {
  python3 -m benchmarks.bench_textgen_lora --system punica --batch-size 32 --num-requests 256 --max-output 128 \
    --warmup-requests 32 --out-dir "$OUT" "$@" 2>&1 | grep -v -i warn | tail -5
}
textgen
textgen --lora-overlap shrink --lora-stream-priority -1
textgen --lora-overlap delta --lora-stream-priority -1
textgen --sgmv-tuning hybrid_graphs=2
