"""Host time to turn a scheduled step into CUDA-graph inputs: `host_batch` (Python lists from the sequences)
plus `StaticBuffers.write` (those lists into the pinned graph buffers). Runs on any machine (the buffers stay
on the CPU; no copy is timed on a GPU). With overlapped steps this work hides behind the device's step, until
the model is small enough that the host is the bottleneck.

    python -m benchmarks.bench_host [--batch-size 32 128 256] [--context 400]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import environment, print_table, write_jsonl
from punica.engine.cuda_graph import StaticBuffers
from punica.engine.request import SamplingParams, Sequence
from punica.engine.runner import host_batch, order_by_slot

BLOCK = 16


def sequences(batch: int, context: int, num_adapters: int) -> list[Sequence]:
    seqs = []
    blocks = -(-(context + 1) // BLOCK)
    for i in range(batch):
        seq = Sequence(request_id=f"r{i}", prompt_ids=list(range(3, 3 + context)), params=SamplingParams())
        seq.num_computed = context - 1
        seq.block_table = list(range(i * blocks, (i + 1) * blocks))
        seq.slot = 1 + i % num_adapters
        seqs.append(seq)
    return seqs


def time_us(fn, reps: int) -> float:
    for _ in range(max(reps // 10, 3)):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e6 * (time.perf_counter() - t0) / reps


def time_step(work, buf: StaticBuffers, t: int, mixed: bool, reps: int) -> dict:
    hb = host_batch(work, BLOCK)
    build = time_us(lambda: host_batch(work, BLOCK), reps)
    write = time_us(lambda: buf.write(hb, t, mixed), reps)
    return dict(tokens=len(hb.ids), host_batch_us=round(build, 1), write_us=round(write, 1),
                total_us=round(build + write, 1))


def measure(batch: int, context: int, reps: int) -> list[dict]:
    """A decode step of `batch` sequences, and a mixed one: the first sequence's last 128 tokens as a chunk."""
    seqs = sequences(batch, context, num_adapters=batch)
    buf = StaticBuffers(max(4096, batch), batch, -(-4096 // BLOCK), 32, 64, torch.device("cpu"))
    rows = [dict(kind="decode", batch=batch, context=context,
                 **time_step(order_by_slot({s: 1 for s in seqs}), buf, batch, False, reps))]
    seqs[0].num_computed -= 127
    work = order_by_slot({s: 128 if i == 0 else 1 for i, s in enumerate(seqs)})
    bucket = 1 << (127 + batch - 1).bit_length()
    rows.append(dict(kind="mixed", batch=batch, context=context, **time_step(work, buf, bucket, True, reps)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    setup = dict(environment(), bench="host", cpu_threads=1)
    rows = [row for b in args.batch_size for row in measure(b, args.context, args.reps)]
    write_jsonl("host", rows, setup, args.out_dir)
    print_table(rows, ["kind", "batch", "tokens", "host_batch_us", "write_us", "total_us"])


if __name__ == "__main__":
    main()
