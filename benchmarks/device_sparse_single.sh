#!/usr/bin/env bash
# One device call (about 5 minutes on an H200): the batch-256 decode graph over 128 adapters (as the text-
# generation benchmark serves them: about two tokens an adapter) with 2-3 token segments as single items (per-token
# reads of their adapter, the default) and as row blocks of the sparse graph (one read: sparse_single_max=1).
#   PUNICA_GIT_REV=<rev from this machine> bash benchmarks/device_sparse_single.sh
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/punica-out}
mkdir -p "$OUT"
for tuning in "" "sparse_single_max=1"; do
  label=${tuning:-defaults}
  log="$OUT/profile_${label//=/-}.log"  # no '=' in names the device tool sends back
  timeout 170 python3 -m benchmarks.profile_step --graph-only --batch-size 256 --num-adapters 128 --steps 20 \
    --popularity distinct uniform --out-dir "$OUT" ${tuning:+--sgmv-tuning $tuning} > "$log" 2>&1
  echo "[$label] rc $?"
  grep -E "^ *(distinct|uniform) +256" "$log" | tail -4
done
