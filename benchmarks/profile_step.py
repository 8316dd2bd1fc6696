"""Where a decode step's time goes: host phases of `Engine.step`, GPU time of the decode graph, and a
kernel breakdown of one eager step, at the Llama-2-7B architecture (random weights) with LoRA.

    python -m benchmarks.profile_step --batch-size 32 --context 400 --popularity distinct identical none

Prints tables and writes `profile_step.jsonl` (one row per popularity) under --out-dir.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_textgen_lora import SHAPES, TINY, write_adapters, write_model_dir
from benchmarks.harness import (
    add_engine_knobs,
    apply_engine_knobs,
    copy_bandwidth,
    environment,
    parse_tuning,
    print_table,
    write_jsonl,
)
from benchmarks.trace_overlap import kernel_intervals, overlap_summary
from punica import Engine, SamplingParams
from punica.config import KV_CACHE_DTYPES
from punica.engine.runner import host_batch, order_by_slot, to_device_batch
from punica.model import layers
from punica.ops import attention, pdl, sgmv
from punica.workload import adapter_indices


class PhaseTimer:
    """Wraps bound methods of live objects and sums their wall time per name."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.undo = []

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)
        self.undo.append((obj, attr))

    def restore(self) -> None:
        for obj, attr in self.undo:
            delattr(obj, attr)  # the instance attribute shadowed the class method
        self.undo.clear()


def gpu_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_table(fn, top: int = 25) -> list[dict]:
    """GPU time per kernel name over one call of fn, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append(dict(kernel=e.key[:70], calls=e.count, us=round(us, 1)))
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    return rows[:top] + [dict(kernel="TOTAL", calls=sum(r["calls"] for r in rows), us=round(total, 1))]


def graph_overlap(fn) -> dict:
    """trace_overlap's split of one call of fn (a graph replay): LoRA alone, base alone, both, idle (us)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return overlap_summary(kernel_intervals(json.load(f)))


# the LoRA-overlap A/B: (label, LlamaModel.overlap_lora mode, stream priority)
ARRANGEMENTS = (("none", "none", 0), ("delta", "delta", 0), ("delta p-1", "delta", -1), ("shrink", "shrink", 0),
                ("shrink p-1", "shrink", -1), ("o,down shrink", {"o_proj": "shrink", "down_proj": "shrink"}, 0))


def recaptured(engine: Engine, hb, overlap: str | dict, priority: int = 0):
    """Recapture the graph that runs hb with the LoRA overlap arranged this way; its replay."""
    engine.model.overlap_lora(overlap, priority)
    graphs = engine.runner.graphs
    graphs.capture(only=graphs.key(hb))
    graphs.run(hb)
    return graphs.graphs[graphs.key(hb)][0].replay


def arrangements(engine: Engine, hb, prefix: str) -> dict:
    """The graph that runs hb under each LoRA-overlap arrangement: {"<prefix>_ms <label>": replay ms,
    "<prefix>_overlap <label>": its trace split}; then the engine's own arrangement is recaptured."""
    out = {}
    for label, overlap, priority in ARRANGEMENTS:
        replay = recaptured(engine, hb, overlap, priority)
        out[f"{prefix}_ms {label}"] = round(gpu_ms(replay), 3)
        if overlap != "none":
            out[f"{prefix}_overlap {label}"] = graph_overlap(replay)
    recaptured(engine, hb, engine.config.lora_overlap, engine.config.lora_stream_priority)
    return out


LAYER_KNOBS = ("DELTA_FIRST_MIN_TOKENS", "SIDE_STREAM_MAX_TOKENS", "DELTA_OVERWRITE")
ATTENTION_KNOBS = ("DECODE_KV_AS_A",)  # constants of punica.ops.attention, e.g. DECODE_KV_AS_A=never


def apply_knobs(knobs: str, sgmv_defaults: dict, layer_defaults: dict) -> None:
    """Set one knob set ("name=value,name=value"; "" = the defaults): SGMV knobs (sgmv.TUNING) by their names,
    the model's layer constants by theirs (upper case, e.g. DELTA_FIRST_MIN_TOKENS=1000000)."""
    pairs = parse_tuning([k for k in knobs.split(",") if k])
    for name, value in {**layer_defaults, **{k: v for k, v in pairs.items() if k.isupper()}}.items():
        module = attention if name in ATTENTION_KNOBS else layers
        if not hasattr(module, name):
            raise KeyError(f"unknown constant {name!r} of {module.__name__}")
        setattr(module, name, value)
    sgmv.set_tuning(**{**sgmv_defaults, **{k: v for k, v in pairs.items() if not k.isupper()}})


def knob_sweep(engine: Engine, hb, knob_sets: tuple[str, ...], prefix: str = "graph_ms", eager=None) -> dict:
    """The graph that runs hb recaptured under each knob set (apply_knobs), in the given order; {"<prefix>
    knobs <set>": replay ms}. The engine's graph is recaptured under the defaults afterwards. With `eager` (a
    step run without a graph), that step is timed under each set instead."""
    defaults = dict(sgmv.TUNING)
    layer_defaults = {k: getattr(layers, k) for k in LAYER_KNOBS} | {k: getattr(attention, k) for k in ATTENTION_KNOBS}
    out = {}
    try:
        for knobs in knob_sets:
            apply_knobs(knobs, defaults, layer_defaults)
            if eager is None:
                fn, reps = recaptured(engine, hb, engine.config.lora_overlap, engine.config.lora_stream_priority), 20
            else:
                fn, reps = eager, 5
            key = f"{prefix} knobs {knob_label(knobs)}"
            while key in out:  # a set given twice (the defaults first and last: drift)
                key += " again"
            out[key] = round(gpu_ms(fn, reps), 3)
    finally:
        apply_knobs("", defaults, layer_defaults)
        if eager is None:
            recaptured(engine, hb, engine.config.lora_overlap, engine.config.lora_stream_priority)
    return out


def knob_label(knobs: str) -> str:
    return knobs or "defaults"


def prefill_step(engine: Engine, graphs, ordered: list, seqs: int, chunk: int,
                 knob_sets: tuple[str, ...] = ()) -> dict:
    """A prefill-heavy step, like most of text generation's non-decode steps: `seqs` sequences each recompute
    their last `chunk` tokens (their own adapters, as the popularity drew them). Graph replay where a bucket
    fits, eager GPU time, and the kernels of one run; under each knob set (the graph's, or the eager step's
    where none fits)."""
    picked = ordered[:seqs]
    for seq, _ in picked:
        seq.num_computed -= chunk - 1
    try:
        hb = host_batch([(seq, chunk) for seq, _ in picked], engine.runner.block_size)
        out = {"prefill_tokens": len(hb.ids)}
        if graphs is not None and graphs.can_run(hb):
            out["prefill_graph_ms"] = round(gpu_ms(lambda: graphs.run(hb), reps=5), 3)
            out["prefill_kernels"] = kernel_table(lambda: graphs.run(hb))
        batch = to_device_batch(hb, engine.runner.slot_rank, engine.runner.device)
        out["prefill_gpu_ms"] = round(gpu_ms(lambda: engine.model(batch), reps=5), 3)
        if "prefill_kernels" not in out:
            out["prefill_kernels"] = kernel_table(lambda: engine.model(batch))
        if knob_sets:
            graph = "prefill_graph_ms" in out
            out.update(knob_sweep(engine, hb, knob_sets, "prefill_graph_ms" if graph else "prefill_gpu_ms",
                                  eager=None if graph else lambda: engine.model(batch)))
        return out
    finally:
        for seq, _ in picked:
            seq.num_computed += chunk - 1


def profile(engine: Engine, popularity: str, names: list[str], batch: int, context: int, steps: int,
            prefill: tuple[int, int] = (0, 0), graph_only: bool = False, knob_sets: tuple[str, ...] = (),
            mixed_chunk: int = 128, mixed_only: bool = False, side_stream_max: int | None = None) -> dict:
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    idx = adapter_indices(popularity, batch, len(names), seed=0) if names and popularity != "none" else None
    for i in range(batch):
        ids = torch.randint(3, vocab, (context,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=steps * 3 + 8, temperature=0.0, ignore_eos=True),
                           names[idx[i]] if idx is not None else None)
    while any(s.num_remaining > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "forward", "forward (host)")
    timer.wrap(engine.runner, "sample", "sample")
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) / steps
    timer.restore()
    engine.sync()  # no placeholders left: the batches below can run on their own
    phases = {f"{k} us": round(1e6 * v / steps) for k, v in timer.total.items()}
    row = dict(popularity=popularity, batch=batch, context=context, step_ms=round(1e3 * wall, 3), **phases)
    if not torch.cuda.is_available():
        return row

    work = {s: 1 for s in engine.scheduler.running}
    for seq in work:  # the batches below bypass the scheduler: give each its next token's KV block
        engine.blocks.grow(seq.block_table, seq.num_computed + 1)
    ordered = order_by_slot(work)
    hb = host_batch(ordered, engine.runner.block_size)
    graphs = engine.runner.graphs
    if graphs is not None:
        graphs.run(hb)
        graph, _, _ = graphs.graphs[graphs.key(hb)]
        row["graph_replay_ms"] = round(gpu_ms(graph.replay), 3)
        row["graph_kernels"] = kernel_table(graph.replay)
        row["graph_overlap"] = graph_overlap(graph.replay)
        if knob_sets and not mixed_only:
            row.update(knob_sweep(engine, hb, knob_sets))
        if graph_only:
            abort_all(engine)
            return row
        if mixed_only:
            row.update(mixed_graph(engine, graphs, ordered, mixed_chunk, arranged=side_stream_max is not None,
                                   knob_sets=knob_sets))
            abort_all(engine)
            return row
        if any(hb.seq_slots):
            row.update(arrangements(engine, hb, "graph"))
        pdl.set_pdl(not pdl.pdl_enabled())  # the same graph with programmatic dependent launch flipped
        replay = recaptured(engine, hb, engine.config.lora_overlap, engine.config.lora_stream_priority)
        row[f"graph_ms pdl {pdl.pdl_enabled()}"] = round(gpu_ms(replay), 3)
        pdl.set_pdl(not pdl.pdl_enabled())
        recaptured(engine, hb, engine.config.lora_overlap, engine.config.lora_stream_priority)
    device_batch = to_device_batch(hb, engine.runner.slot_rank, engine.runner.device)
    model = engine.model
    row["eager_gpu_ms"] = round(gpu_ms(lambda: model(device_batch), reps=5), 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(device_batch)
    row["eager_host_ms"] = round(1e3 * (time.perf_counter() - t0), 3)  # launches only: no sync inside
    torch.cuda.synchronize()
    row["eager_kernels"] = kernel_table(lambda: model(device_batch))
    if graphs is not None:
        row.update(mixed_graph(engine, graphs, ordered, mixed_chunk, knob_sets=knob_sets))
    first = ordered[0][0]  # the mixed step again, eager
    first.num_computed -= mixed_chunk - 1
    mixed = to_device_batch(host_batch([(first, mixed_chunk)] + ordered[1:], engine.runner.block_size),
                            engine.runner.slot_rank, engine.runner.device)
    row["mixed_gpu_ms"] = round(gpu_ms(lambda: model(mixed), reps=5), 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(mixed)
    row["mixed_host_ms"] = round(1e3 * (time.perf_counter() - t0), 3)
    torch.cuda.synchronize()
    first.num_computed += mixed_chunk - 1
    if prefill[0]:
        row.update(prefill_step(engine, graphs, ordered, *prefill, knob_sets=knob_sets))
    abort_all(engine)
    return row


def mixed_graph(engine: Engine, graphs, ordered: list, chunk: int, arranged: bool = True,
                knob_sets: tuple[str, ...] = ()) -> dict:
    """A mixed step's graph: the first sequence recomputes its last `chunk` tokens (a prefill chunk) among the
    others' decodes. Its replay ms, host ms, kernels and overlap; with `arranged`, also under each LoRA-overlap
    arrangement; under each knob set."""
    first = ordered[0][0]
    first.num_computed -= chunk - 1
    try:
        hb = host_batch([(first, chunk)] + ordered[1:], engine.runner.block_size)
        if not graphs.can_run(hb):
            return {}
        row = {"mixed_tokens": len(hb.ids), "mixed_graph_ms": round(gpu_ms(lambda: graphs.run(hb)), 3)}
        t0 = time.perf_counter()
        graphs.run(hb)
        row["mixed_graph_host_ms"] = round(1e3 * (time.perf_counter() - t0), 3)
        torch.cuda.synchronize()
        row["mixed_graph_kernels"] = kernel_table(lambda: graphs.run(hb))
        row["mixed_graph_overlap"] = graph_overlap(graphs.graphs[graphs.key(hb)][0].replay)
        if arranged and any(hb.seq_slots):
            row.update(arrangements(engine, hb, "mixed_graph"))
        if knob_sets:
            row.update(knob_sweep(engine, hb, knob_sets, "mixed_graph_ms"))
        return row
    finally:
        first.num_computed += chunk - 1


def abort_all(engine: Engine) -> None:
    for seq in list(engine.scheduler.running):
        engine.abort(seq.request_id)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32],
                    help="one engine sized for the largest; each batch size profiled in turn")
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--popularity", nargs="+", default=["distinct", "identical", "none"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--prefill", type=int, nargs=2, default=(0, 0), metavar=("SEQS", "CHUNK"),
                    help="also a prefill step: SEQS sequences recompute their last CHUNK tokens (CHUNK < context)")
    ap.add_argument("--mixed-chunk", type=int, default=128,
                    help="the mixed step's prefill chunk (tokens, < context) among the other sequences' decodes")
    ap.add_argument("--num-adapters", type=int, default=None,
                    help="adapters the popularities draw from (default: 2 x the batch, as many as written: the "
                         "largest batch); the text-generation benchmark serves min(2 x batch, 128)")
    ap.add_argument("--graph-only", action="store_true",
                    help="the decode graph's replay, kernels and overlap only (no arrangements, eager or mixed steps)")
    ap.add_argument("--mixed-only", action="store_true",
                    help="the decode graph's replay and kernels, then the mixed step's graph (replay, kernels, "
                         "overlap, --knobs sweeps) only: no eager steps or PDL flip; its LoRA-overlap arrangements "
                         "only with --side-stream-max-tokens")
    ap.add_argument("--knobs", nargs="+", default=(), metavar="NAME=VALUE[,NAME=VALUE]",
                    help="also the decode graph (and, without --graph-only, the mixed and prefill steps) "
                         "recaptured or rerun under each set of SGMV knobs or layer constants such as "
                         "DELTA_FIRST_MIN_TOKENS=1000000 (\"\" = the defaults)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b",
                    help="the random model's architecture and sizes")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (random magnitudes), served with enable_dora")
    ap.add_argument("--kv-cache-dtype", choices=sorted(KV_CACHE_DTYPES), default="auto",
                    help="the KV pool's dtype (CacheConfig.kv_cache_dtype)")
    add_engine_knobs(ap)
    args = ap.parse_args(argv)
    knobs = apply_engine_knobs(args)
    cfg = TINY if args.tiny else SHAPES[args.shape]
    bandwidth = copy_bandwidth() if torch.cuda.is_available() else float("nan")
    setup = dict(environment(), bench="profile_step", copy_bandwidth_GBps=round(bandwidth / 1e9, 1),
                 shape="tiny" if args.tiny else args.shape, dora=args.dora, kv_cache_dtype=args.kv_cache_dtype,
                 **knobs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_model_dir(root, cfg)
        max_batch = max(args.batch_size)
        adapters = write_adapters(root, cfg, args.num_adapters or max_batch, args.rank, args.dora)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # no prefix cache: every popularity draws the same seeded prompts
        engine = Engine.from_args(model_dir, adapters, device=device, load_format="dummy", enable_prefix_caching=False,
                                  max_num_seqs=max_batch, max_loras=len(adapters), max_cpu_loras=len(adapters),
                                  max_lora_rank=args.rank, max_num_batched_tokens=4096, enable_dora=args.dora,
                                  kv_cache_dtype=args.kv_cache_dtype)
        rows = []
        for pop, batch in [(p, b) for b in args.batch_size for p in args.popularity]:
            names = list(adapters)[:args.num_adapters or 2 * batch]
            row = profile(engine, pop, names, batch, args.context, args.steps, tuple(args.prefill),
                          args.graph_only, tuple(args.knobs), args.mixed_chunk, args.mixed_only,
                          args.side_stream_max_tokens)
            for key in ("graph_kernels", "eager_kernels", "mixed_graph_kernels", "prefill_kernels"):
                if key in row:
                    print(f"\n{pop}, batch {batch}: {key}")
                    print_table(row[key], ["kernel", "calls", "us"])
            rows.append(row)
            write_jsonl("profile_step", [row], setup, args.out_dir)
    print()
    traced = ("graph_overlap", "mixed_graph_overlap")
    overlaps = [dict(popularity=r["popularity"], batch=r["batch"], graph=key.split(" ")[0].removesuffix("_overlap"),
                     overlap=key.partition(" ")[2] or "engine's", **value)
                for r in rows for key, value in r.items() if key.split(" ")[0] in traced]
    if overlaps:  # each graph's span split by which kernels run (benchmarks/trace_overlap.py)
        print_table(overlaps, ["popularity", "batch", "graph", "overlap", "span_us", "lora_only_us", "base_only_us",
                               "both_us", "idle_us", "lora_kernel_us", "base_kernel_us"])
        print()
    arrangements = [f"graph_ms {label}" for label, _, _ in ARRANGEMENTS]
    print_table(rows, ["popularity", "batch", "graph_replay_ms", *arrangements, f"graph_ms pdl {not args.pdl}"])
    print()
    print_table(rows, ["popularity", "batch", "mixed_tokens", "mixed_graph_ms", *(f"mixed_{a}" for a in arrangements)])
    print()
    print_table(rows, ["popularity", "batch", "step_ms", "schedule us", "forward (host) us", "sample us",
                       "graph_replay_ms", "eager_gpu_ms", "eager_host_ms", "mixed_gpu_ms", "mixed_host_ms",
                       "mixed_graph_ms", "mixed_graph_host_ms"])
    if args.prefill[0]:
        print()
        print_table(rows, ["popularity", "prefill_tokens", "prefill_graph_ms", "prefill_gpu_ms"])
    for r in rows:  # --knobs: ms to three decimals (print_table keeps one)
        for graph in ("graph_ms", "mixed_graph_ms", "prefill_graph_ms", "prefill_gpu_ms"):
            sweep = [f"{key.removeprefix(graph + ' knobs ')}: {v}" for key, v in r.items()
                     if key.startswith(graph + " knobs")]
            if sweep:
                print(r["popularity"], r["batch"], graph, *sweep, sep="  ")


if __name__ == "__main__":
    main()
