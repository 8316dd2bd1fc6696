"""Host time per step, on any machine (nothing here is timed on a GPU):

1. turning a scheduled step into CUDA-graph inputs: `host_batch` (Python lists from the sequences) plus
   `StaticBuffers.write` (those lists into the pinned graph buffers);
2. a whole decode `Engine.step()` with the model replaced by a stub (greedy picks of random tokens): scheduling,
   batch building, sampling, reading tokens, detokenizing and reporting, after `--generated` tokens per request,
   with the prefix cache's bookkeeping and without.

With overlapped steps this work hides behind the device's step, until the model is small enough that the
host is the bottleneck.

    python -m benchmarks.bench_host [--batch-size 32 128 256] [--context 400] [--generated 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_textgen_lora import TINY, write_adapters, write_model_dir
from benchmarks.harness import environment, print_table, write_jsonl
from punica.demo_model import default_model_dir
from punica.engine.cuda_graph import StaticBuffers
from punica.engine.engine import Engine
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


def time_step(work, buf: StaticBuffers, t: int, kind: str, reps: int) -> dict:
    hb = host_batch(work, BLOCK)
    build = time_us(lambda: host_batch(work, BLOCK), reps)
    write = time_us(lambda: buf.write(hb, t, kind), reps)
    return dict(tokens=len(hb.ids), host_batch_us=round(build, 1), write_us=round(write, 1),
                total_us=round(build + write, 1))


def measure(batch: int, context: int, reps: int) -> list[dict]:
    """A decode step of `batch` sequences, and a mixed one: the first sequence's last 128 tokens as a chunk."""
    seqs = sequences(batch, context, num_adapters=batch)
    buf = StaticBuffers(max(4096, batch), batch, -(-4096 // BLOCK), 32, 64, torch.device("cpu"))
    rows = [dict(kind="decode", batch=batch, context=context,
                 **time_step(order_by_slot({s: 1 for s in seqs}), buf, batch, "decode", reps))]
    seqs[0].num_computed -= 127
    work = order_by_slot({s: 128 if i == 0 else 1 for i, s in enumerate(seqs)})
    bucket = 1 << (127 + batch - 1).bit_length()
    rows.append(dict(kind="mixed", batch=batch, context=context, **time_step(work, buf, bucket, "mixed", reps)))
    return rows


def engine_step(model_dir: str, adapters: dict[str, str], batch: int, context: int, generated: int,
                reps: int, caching: bool = True) -> dict:
    """Host time of a decode Engine.step() at `batch` requests, each `generated` tokens into its answer
    (`caching`: with the prefix cache's bookkeeping; the random prompts share nothing)."""
    engine = Engine.from_args(model_dir, adapters, device="cpu", load_format="dummy", max_num_seqs=batch,
                              max_loras=len(adapters), max_cpu_loras=len(adapters), max_lora_rank=8,
                              max_num_batched_tokens=max(4096, batch), max_model_len=context + generated + 8 * reps,
                              enable_prefix_caching=caching)
    vocab, picks = TINY["vocab_size"], torch.Generator().manual_seed(1)

    def stub(b):  # host work only: logits whose greedy pick is a random ordinary token
        rows = b.logits_indices.shape[0]
        return torch.zeros(rows, vocab).index_put_((torch.arange(rows), torch.randint(3, vocab, (rows,),
                                                                                     generator=picks)), torch.ones(1))

    engine.model.forward = stub
    names, gen = list(adapters), torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(3, vocab, (context,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=generated + 8 * reps, temperature=0.0, ignore_eos=True),
                           names[i % len(names)])
    while min((len(s.tokens) - len(s.prompt_ids) for s in engine.scheduler.running), default=0) < generated:
        engine.step()
    step_us = min(time_us(engine.step, reps) for _ in range(3))  # the least disturbed of three runs (noisy hosts)
    return dict(kind="engine_step", batch=batch, context=context, generated=generated, prefix_caching=caching,
                step_us=round(step_us, 1))


def tiny_model_with_tokenizer(root: Path) -> str:
    """The tiny random model, with the demo model's tokenizer (its first 512 ids are ordinary tokens), so
    detokenization is timed too."""
    model_dir = write_model_dir(root, TINY)
    demo = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(demo, name), os.path.join(model_dir, name))
    return model_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--generated", type=int, default=256, help="tokens already generated per request (engine step)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    setup = dict(environment(), bench="host", cpu_threads=1)
    rows = [row for b in args.batch_size for row in measure(b, args.context, args.reps)]
    print_table(rows, ["kind", "batch", "tokens", "host_batch_us", "write_us", "total_us"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = tiny_model_with_tokenizer(root)
        adapters = write_adapters(root, TINY, 64, 8)
        steps = [engine_step(model_dir, adapters, b, args.context, args.generated, reps=20, caching=caching)
                 for b in args.batch_size for caching in (True, False)]
    print_table(steps, ["kind", "batch", "generated", "prefix_caching", "step_us"])
    write_jsonl("host", rows + steps, setup, args.out_dir)


if __name__ == "__main__":
    main()
