"""One decode attention call (after a warm-up) for Nsight Compute to profile, Llama-2-7B heads at batch 32:

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats -k regex:_decode_kernel -c 1 \\
        python -m benchmarks.ncu_decode --kv-dtype fp8 --kv-as-a always --tile 64,4,1

The kernel is launched twice; `-c 1` with `--launch-skip 1` profiles the second.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_attention import Pools, context_lens
from punica.ops import attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--kv-as-a", choices=["never", "always"], default="never")
    ap.add_argument("--tile", default="64,4,3", metavar="BLOCK_N,WARPS,STAGES")
    ap.add_argument("--context", default="400")
    args = ap.parse_args()
    block_n, warps, stages = (int(v) for v in args.tile.split(","))
    attention.DECODE_KV_AS_A = args.kv_as_a
    attention.decode_config = lambda *_: dict(BLOCK_G=16, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    pools = Pools(1, context_lens(args.context, 32), 32, 32, 128, 4096, "cuda",
                  torch.float8_e4m3fn if args.kv_dtype == "fp8" else None)
    pools.order(True)
    for _ in range(2):
        pools.run(1)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
