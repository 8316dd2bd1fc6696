#!/usr/bin/env bash
# Session 21: the decode attention kernel with K and V as its dots' first operand (attention.DECODE_KV_AS_A), so a
# converted fp8 tile feeds the tensor cores from registers. Results under $OUT:
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_as_a.sh attention   # the GPU tier, how the kernel builds, and
#                                                                      # bench_attention of both orientations
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_as_a.sh textgen KV ORIENTATION...   # batch-32 text generation
# bench_attention: batch 32, Llama-2-7B heads, contexts 400 and mixed, 8 layers in one graph, longest-first, the
# first 5 tile shapes, bf16 and fp8 pools. Text generation: 1000 requests, outputs <= 256, backbone and distinct.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mode=${1:?attention or textgen}
shift
mkdir -p "$OUT"
if [ "$mode" = attention ]; then
  source benchmarks/gpu_tier.sh
  python3 tests/ops/sm90_compile.py --decode-report 2>&1 | tee "$OUT/decode_report.log"
  for kv in auto fp8; do
    timeout 200 python3 -m benchmarks.bench_attention --batch-size 32 --context 400 mixed --splits 0 \
      --order longest-first --tiles 5 --kv-as-a never always --kv-dtype $kv --out-dir "$OUT" \
      > "$OUT/attention_$kv.log" 2>&1
    tail -6 "$OUT/attention_$kv.log"
  done
elif [ "$mode" = sweep ]; then
  timeout 280 python3 -m benchmarks.bench_attention --batch-size 32 --context 400 mixed 1024 --splits 1 2 \
    --order longest-first --fp8-dot-fp16 on --kv-as-a never always --kv-dtype fp8 --out-dir "$OUT" \
    --tile 64,4,1 64,4,2 64,4,3 128,4,2 128,4,3 128,8,2 128,8,3 64,8,2 32,4,2 32,4,3 256,8,2 \
    > "$OUT/attention_sweep_fp8.log" 2>&1
  tail -8 "$OUT/attention_sweep_fp8.log"
  timeout 150 python3 -m benchmarks.bench_attention --batch-size 32 --context 400 mixed --splits 1 2 \
    --order longest-first --kv-as-a never always --kv-dtype auto --out-dir "$OUT" \
    --tile 64,4,3 128,4,2 128,4,3 128,8,2 > "$OUT/attention_sweep_bf16.log" 2>&1
  tail -6 "$OUT/attention_sweep_bf16.log"
elif [ "$mode" = ncu ]; then  # Nsight Compute on the decode kernel: bf16 as it is, fp8 both ways
  for spec in "auto never 64,4,3" "fp8 never 64,4,3" "fp8 always 64,4,1" "fp8 always 64,4,3"; do
    set -- $spec
    echo "== kv $1, kv_as_a $2, tile $3"
    timeout 120 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis -k regex:_decode_kernel --launch-skip 1 -c 1 \
      python3 -m benchmarks.ncu_decode --kv-dtype $1 --kv-as-a $2 --tile $3 > "$OUT/ncu_$1_$2_${3//,/_}.txt" 2>&1
    grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Issued Ipc|Executed Ipc|Warp Cycles Per Issued" "$OUT/ncu_$1_$2_${3//,/_}.txt" | head -30
  done
elif [ "$mode" = final ]; then  # kernel tests, the defaults' rows (and GQA heads), text generation fp8 both ways
  timeout 120 python3 -m pytest -m gpu -q -n 8 tests/ops/test_attention.py tests/ops/test_kv_store.py \
    > "$OUT/gpu_tests_attention.full" 2>&1
  grep -E "^(FAILED|ERROR|E  )" "$OUT/gpu_tests_attention.full" | head -20; tail -1 "$OUT/gpu_tests_attention.full"
  for heads in "32 32 128" "32 8 128"; do
    timeout 150 python3 -m benchmarks.bench_attention --batch-size 32 --context 400 mixed 1024 --splits 0 \
      --order longest-first --tiles 1 --fp8-dot-fp16 on --kv-as-a never always --kv-dtype fp8 --heads $heads \
      --out-dir "$OUT" > "$OUT/attention_final.log" 2>&1
    tail -7 "$OUT/attention_final.log"
  done
  for as_a in fp8 never; do
    echo "bench_textgen_lora --kv-cache-dtype fp8 --decode-kv-as-a $as_a"
    timeout 200 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct identical \
      --batch-size 32 --num-requests 1000 --max-output 256 --kv-cache-dtype fp8 --decode-kv-as-a "$as_a" \
      --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/textgen_fp8_$as_a.log"
    tail -4 "$OUT/textgen_fp8_$as_a.log"
  done
elif [ "$mode" = graph ]; then  # the decode graph of the whole model, fp8 cache, both orientations in one process
  for ctx in 400 1000; do
    timeout 250 python3 -m benchmarks.profile_step --graph-only --batch-size 32 --popularity none distinct \
      --kv-cache-dtype fp8 --context $ctx --knobs "" DECODE_KV_AS_A=never "" --out-dir "$OUT" 2>&1 \
      | grep -v -i warn > "$OUT/profile_kv_as_a_$ctx.log"
    grep -B1 -A3 "knobs" "$OUT/profile_kv_as_a_$ctx.log" | tail -8
  done
else
  kv=${1:?kv cache dtype}
  shift
  for as_a in "$@"; do
    echo "bench_textgen_lora --kv-cache-dtype $kv --decode-kv-as-a $as_a"
    timeout 240 python3 -m benchmarks.bench_textgen_lora --system backbone punica --popularity distinct \
      --batch-size 32 --num-requests 1000 --max-output 256 --kv-cache-dtype "$kv" --decode-kv-as-a "$as_a" \
      --out-dir "$OUT" 2>&1 | grep -v -i warn > "$OUT/textgen_${kv}_$as_a.log"
    tail -4 "$OUT/textgen_${kv}_$as_a.log"
  done
fi
# (session 21's second call, the wider sweep:)
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_as_a.sh sweep
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_as_a.sh ncu     # Nsight Compute on four decode variants
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_as_a.sh final   # the chosen defaults: tests, attention, textgen
#   PUNICA_GIT_REV=<rev> bash benchmarks/device_kv_as_a.sh graph   # decode graphs (profile_step), both orientations
