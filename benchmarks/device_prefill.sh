#!/usr/bin/env bash
# One device call (about 7 minutes on an H200), results under $OUT: the LoRA of prefill-heavy steps. In session
# 7's profile a 4096-token prefill step (16 x 256, distinct adapters) took 96.2 ms against 86.8 without LoRA,
# 11.2 ms of it in 128 expands (~2x the bytes of reading and writing y at copy speed).
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_prefill.sh
# 1. the GPU tier; 2. the expand / shrink launch knobs on that step's LoRA chain (bench_lora_chain --prefill);
# 3. the prefill step and text generation at batch 32 (256 requests) with the defaults, with the chain's
# best knobs, and with LoRA beside the GEMM in steps of up to 4096 tokens (layers.SIDE_STREAM_MAX_TOKENS).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -m gpu -q -n 8 --timeout 90 tests/ops tests/test_gpu_engine.py 2>&1 | tail -6 \
  > "$OUT/gpu_tests.log"
tail -2 "$OUT/gpu_tests.log"
timeout 130 python3 -m benchmarks.bench_lora_chain --batch-size 32 --prefill 16 256 --padded --tilings hybrid default \
  --popularity distinct identical --variants prefill --budget-s 100 --out-dir "$OUT" 2>&1 | grep -v -i warn | tail -14
BEST=$(python3 - "$OUT/lora_chain.jsonl" <<'PY'
import json, sys
totals = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("prefill") and r["tiling"] == "hybrid":
        totals.setdefault(json.dumps(r["knobs"], sort_keys=True), []).append(r["us_per_layer"])
full = max(map(len, totals.values()))
best = min((sum(v), k) for k, v in totals.items() if len(v) == full)[1]
print(" ".join(f"{k}={v}" for k, v in json.loads(best).items()))
PY
)
echo "best prefill knobs: ${BEST:-defaults}"
variants=("" "--side-stream-max-tokens 4096")
[ -n "$BEST" ] && variants+=("--sgmv-tuning $BEST")
for variant in "${variants[@]}"; do
  echo "== ${variant:-defaults}"
  timeout 60 python3 -m benchmarks.profile_step --batch-size 32 --popularity distinct --steps 3 --prefill 16 256 \
    --out-dir "$OUT" $variant 2>&1 | grep -v -i warn | grep -A2 "prefill_tokens"
  timeout 100 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct identical \
    --batch-size 32 --num-requests 256 --max-output 128 --warmup-requests 32 --out-dir "$OUT" $variant \
    2>&1 | grep -v -i warn | tail -4
done
