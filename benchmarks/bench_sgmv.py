"""SGMV microbenchmark (issue 3): the LoRA add-on of one projection, h_in=4096 -> h_out, 128 adapters
resident, against the backbone x @ W alone, a naive loop over adapters and gather-BMM.

    python -m benchmarks.bench_sgmv --quick        the issue's target cases as a table (+ sgmv_quick.jsonl)
    python -m benchmarks.bench_sgmv                the sweep (+ sgmv.jsonl and the backbone-vs-SGMV PNG)
    python -m benchmarks.bench_sgmv --tune         launch-knob sweep on the target cases (sgmv_tune.jsonl)
    python -m benchmarks.bench_sgmv --work-lists   the CUDA graphs' tilings side by side (sgmv_work_lists.jsonl)

Times are GPU microseconds, median over --reps, L2 flushed before each rep: `eager` (events around the
Python call) and `graph` (one CUDA-graph replay). Achieved bandwidth counts the fewest bytes the op must
move (each used adapter's A and B once, x read, y read and written) against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from benchmarks import harness
from punica.lora.plan import build_segment_plan, hybrid_items, work_items
from punica.ops import pdl, sgmv
from punica.workload import adapter_indices

H_IN = 4096
NUM_ADAPTERS = 128
POPULARITY = ("distinct", "uniform", "zipf:1.5", "identical")
# (h_out, r, tokens, best Distinct us of Punica CUDA / vLLM Triton on this H200; ours must not exceed it)
TARGETS = [(4096, 16, 1, 11.4), (4096, 16, 64, 21.5), (4096, 16, 128, 32.0), (11008, 64, 32, 36.1),
           (11008, 64, 128, 99.4)]


@dataclass
class Problem:
    h_out: int
    r: int
    tokens: int
    popularity: str
    lora_a: torch.Tensor  # [slots, r, h_in]
    lora_b: torch.Tensor  # [slots, h_out, r]
    slot_rank: torch.Tensor
    W: torch.Tensor       # [h_in, h_out]
    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    plan: sgmv.SegmentPlan
    token_slot: torch.Tensor  # int64, for gather-BMM

    @property
    def used_slots(self) -> int:
        return len(set(self.plan.host_slot) - {0})


@functools.lru_cache(maxsize=1)
def weights(h_out: int, r: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(NUM_ADAPTERS + 1, r, H_IN, device="cuda", generator=gen).div_(H_IN ** 0.5).bfloat16()
    b = torch.randn(NUM_ADAPTERS + 1, h_out, r, device="cuda", generator=gen).div_(r ** 0.5).bfloat16()
    a[0], b[0] = 0, 0
    slot_rank = torch.full((NUM_ADAPTERS + 1,), r, dtype=torch.int32, device="cuda")
    slot_rank[0] = 0
    W = torch.randn(H_IN, h_out, device="cuda", generator=gen).div_(H_IN ** 0.5).bfloat16()
    return a, b, slot_rank, W


def make_problem(h_out: int, r: int, tokens: int, popularity: str, prefill: int = 0) -> Problem:
    """`tokens` one-token requests with adapters drawn by `popularity`; with `prefill`, the first request
    is a chunk of that many tokens instead (a step mixing a prefill with decodes)."""
    a, b, slot_rank, W = weights(h_out, r)
    slots = sorted(i + 1 for i in adapter_indices(popularity, tokens, NUM_ADAPTERS))
    lengths = [prefill or 1] + [1] * (tokens - 1)
    plan = build_segment_plan(slots, lengths, torch.device("cuda"))
    tokens = sum(lengths)
    x = torch.randn(tokens, H_IN, device="cuda").bfloat16()
    y = torch.randn(tokens, h_out, device="cuda").bfloat16()
    v = torch.randn(tokens, r, device="cuda").bfloat16()
    return Problem(h_out, r, tokens, popularity, a, b, slot_rank, W, x, y, v, plan, plan.token_slot.long())


def system_fns(p: Problem) -> dict:
    """name -> zero-argument callable for every system."""
    offs = (0, p.h_out)
    y_base = torch.empty(p.tokens, p.h_out, device="cuda", dtype=torch.bfloat16)

    def loop():
        for s, slot in enumerate(p.plan.host_slot):
            rows = slice(p.plan.host_indptr[s], p.plan.host_indptr[s + 1])
            p.y[rows] += (p.x[rows] @ p.lora_a[slot].T) @ p.lora_b[slot].T

    def gather():
        v = torch.bmm(p.lora_a.index_select(0, p.token_slot), p.x[:, :, None])
        p.y.add_(torch.bmm(p.lora_b.index_select(0, p.token_slot), v).squeeze(-1))

    return dict(
        backbone=lambda: torch.mm(p.x, p.W, out=y_base),
        loop=loop,
        gather=gather,
        ours=lambda: sgmv.add_lora_triton(p.y, p.x, p.lora_a, p.lora_b, p.slot_rank, p.plan, offs),
        shrink=lambda: sgmv.sgmv_shrink_triton(p.x, p.lora_a, p.slot_rank, p.plan, p.v, num_slices=1),
        expand=lambda: sgmv.sgmv_expand_triton(p.v, p.lora_b, p.slot_rank, p.plan, p.y, offs),
    )


def min_bytes(p: Problem, system: str) -> int:
    """The fewest bytes `system` must move through device memory."""
    x, y, a, b = p.tokens * H_IN * 2, p.tokens * p.h_out * 2, p.r * H_IN * 2, p.r * p.h_out * 2
    if system == "backbone":
        return x + H_IN * p.h_out * 2 + y
    if system == "shrink":
        return x + p.used_slots * a + p.tokens * p.r * 2
    if system == "expand":
        return p.tokens * p.r * 2 + p.used_slots * b + 2 * y
    return x + p.used_slots * (a + b) + 2 * y


def measure(p: Problem, system: str, fn, args, flush, copy_bw: float) -> dict:
    eager = harness.time_eager(fn, reps=args.reps, flush=flush)
    graph = harness.time_graph(fn, reps=args.reps, flush=flush)
    nbytes = min_bytes(p, system)
    row = dict(system=system, h_in=H_IN, h_out=p.h_out, r=p.r, tokens=p.tokens, popularity=p.popularity,
               segments=p.plan.num_segments, eager_us=eager, graph_us=graph, bytes=nbytes,
               copy_speed_us=nbytes / copy_bw * 1e6, bw_frac=nbytes / copy_bw / (graph * 1e-6))
    if system == "ours":
        row["host_us"] = harness.host_overhead_us(fn)
    return row


def run_quick(args, flush, copy_bw, setup) -> list[dict]:
    """The target cases: Distinct and Identical, ours (and its halves) next to the backbone."""
    rows, table = [], []
    for h_out, r, tokens, target in TARGETS:
        per_pop = {}
        for pop in ("distinct", "identical"):
            p = make_problem(h_out, r, tokens, pop)
            fns = system_fns(p)
            for system in ("backbone", "ours", "shrink", "expand"):
                if system == "backbone" and pop != "distinct":
                    continue
                row = measure(p, system, fns[system], args, flush, copy_bw)
                rows.append(row)
                per_pop[(pop, system)] = row
        d, i = per_pop[("distinct", "ours")], per_pop[("identical", "ours")]
        table.append(dict(case=f"{H_IN}->{h_out} r{r}", T=tokens,
                          backbone=per_pop[("distinct", "backbone")]["graph_us"], D=d["graph_us"], I=i["graph_us"],
                          target=target, ok="yes" if d["graph_us"] <= target else "NO",
                          D_over_I=d["graph_us"] / i["graph_us"], D_eager=d["eager_us"],
                          D_shrink=per_pop[("distinct", "shrink")]["graph_us"],
                          D_expand=per_pop[("distinct", "expand")]["graph_us"],
                          I_shrink=per_pop[("identical", "shrink")]["graph_us"],
                          I_expand=per_pop[("identical", "expand")]["graph_us"],
                          copy_us=d["copy_speed_us"], bw_pct=100 * d["bw_frac"], host_us=d["host_us"]))
    harness.write_jsonl("sgmv_quick", rows, setup, args.out_dir)
    print(f"\n{setup.get('gpu')}  git {setup['git']}  copy {copy_bw / 1e12:.2f} TB/s  "
          "(graph replay, L2 flushed, us)")
    harness.print_table(table, list(table[0]))
    return rows


def run_sweep(args, flush, copy_bw, setup) -> list[dict]:
    rows = []
    for h_out in args.h_out:
        for r in args.ranks:
            for tokens in args.tokens:
                for pop in args.popularity:
                    p = make_problem(h_out, r, tokens, pop)
                    fns = system_fns(p)
                    for system in args.systems:
                        if system == "backbone" and (pop != args.popularity[0] or r != args.ranks[0]):
                            continue
                        if system == "loop" and tokens > args.loop_max_tokens:
                            continue
                        rows.append(measure(p, system, fns[system], args, flush, copy_bw))
                    print(f"h_out {h_out} r {r} T {tokens} {pop}: " + "  ".join(
                        f"{x['system']} {x['graph_us']:.1f}" for x in rows if x["tokens"] == tokens and
                        x["popularity"] == pop and x["r"] == r and x["h_out"] == h_out), flush=True)
    harness.write_jsonl("sgmv", rows, setup, args.out_dir)
    return rows


def with_tiling(plan: sgmv.SegmentPlan, tiling: str, rows: int = 32, single_max: int = 1) -> sgmv.SegmentPlan:
    """The plan as CUDA graphs give it: "token" (a segment per token: decode graphs), "work_list" (row blocks:
    mixed graphs) or "hybrid" (single tokens first, then row blocks: TUNING["hybrid_graphs"]; segments of at most
    `single_max` tokens are single items)."""
    if tiling == "default":
        return plan
    if tiling == "token":
        per_token = plan.token_slot.tolist()
        indptr = torch.arange(len(per_token) + 1, dtype=torch.int32, device=plan.token_slot.device)
        return dataclasses.replace(plan, seg_indptr=indptr, seg_slot=plan.token_slot, max_seg_len=1,
                                   host_indptr=indptr.tolist(), host_slot=per_token)
    if tiling == "hybrid":
        singles, blocks = hybrid_items(plan.host_indptr, plan.host_slot, rows, single_max)
    else:
        singles, blocks = [], work_items(plan.host_indptr, plan.host_slot, rows)
    items = torch.tensor(singles + blocks, dtype=torch.int32, device=plan.seg_indptr.device).view(-1, 3)
    return dataclasses.replace(plan, items=items, item_rows=rows, num_single=len(singles) // 3)


def run_work_lists(args, flush, copy_bw, setup) -> list[dict]:
    """Graph replay of the add-on in the default tiling (token or segment), as a work list (mixed-step
    graphs today) and as a hybrid work list, for decode batches and for a 128-token chunk among decodes."""
    rows, table = [], []
    for h_out, r in ((4096, 16), (11008, 16), (11008, 64)):
        for tokens, prefill in ((32, 0), (128, 0), (256, 0), (32, 128)):
            for pop in ("distinct", "uniform", "identical"):
                p = make_problem(h_out, r, tokens, pop, prefill)
                entry = dict(case=f"{H_IN}->{h_out} r{r}", T=p.tokens, prefill=prefill, popularity=pop)
                for tiling in ("default", "work_list", "hybrid"):
                    plan = with_tiling(p.plan, tiling)
                    fn = functools.partial(sgmv.add_lora_triton, p.y, p.x, p.lora_a, p.lora_b, p.slot_rank, plan,
                                           (0, p.h_out))
                    us = harness.time_graph(fn, reps=args.reps, flush=flush)
                    rows.append(dict(h_out=h_out, r=r, tokens=p.tokens, prefill=prefill, popularity=pop,
                                     tiling=tiling, graph_us=us))
                    entry[tiling] = us
                table.append(entry)
                print(entry, flush=True)
    harness.write_jsonl("sgmv_work_lists", rows, setup, args.out_dir)
    harness.print_table(table, list(table[0]))
    return rows


TUNE_VARIANTS = {
    "shrink": [{}, dict(shrink_stages=1), dict(bgmv_block_r=16), dict(bgmv_block_r=32), dict(shrink_waves=2),
               dict(shrink_waves=8), dict(shrink_warps=8), dict(split_reduce_elems=4096),
               dict(split_reduce_elems=65536), dict(max_block_k=256), dict(shrink_block_k=64),
               dict(shrink_block_k=256), dict(max_block_m=16), dict(max_block_m=32), dict(shrink_warps=2),
               dict(shrink_warps=1), dict(shrink_stages=4), dict(shrink_stages=5), dict(max_block_k=512),
               dict(max_block_k=512, shrink_warps=2), dict(max_block_k=128, shrink_stages=6),
               dict(shrink_warps=2, shrink_stages=4), dict(shrink_warps=2, shrink_waves=8),
               dict(shrink_sum_after=0)],
    "expand": [{}] + [dict(expand_block_n=bn, expand_warps=nw) for bn in (32, 64, 128, 256) for nw in (2, 4, 8)
                      if (bn, nw) != (128, 4)]
    + [dict(expand_tiles=2), dict(expand_tiles=4), dict(expand_waves=1), dict(expand_waves=16),
       dict(max_block_m=16), dict(max_block_m=32)]
    + [dict(bgmv_expand_tile=t, **k) for t in (16384, 32768)
       for k in ({}, dict(expand_warps=8), dict(expand_stages=3), dict(expand_stages=4))],
}
# (popularity, bgmv_max_seg) per target case: Distinct in token tiling, Identical, and Uniform both ways
TUNE_MODES = (("distinct", 1), ("identical", 1), ("uniform", 1), ("uniform", 1 << 20))


def run_tune(args, flush, copy_bw, setup) -> list[dict]:
    """Each knob variant on each target case and popularity/tiling of TUNE_MODES, per op."""
    defaults, rows, t0 = dict(sgmv.TUNING), [], time.time()
    for h_out, r, tokens, _ in TARGETS:
        if h_out not in args.h_out or r not in args.ranks or tokens not in args.tokens:
            continue
        for pop, mode in TUNE_MODES:
            if pop not in args.popularity or pop == "uniform" and tokens < 32:
                continue
            p = make_problem(h_out, r, tokens, pop)
            for op, variants in TUNE_VARIANTS.items():
                if op not in args.systems:
                    continue
                results = []
                for knobs in variants:
                    if time.time() - t0 > args.budget_s:
                        break
                    sgmv.set_tuning(**{**defaults, "bgmv_max_seg": mode, **knobs})
                    us = harness.time_graph(system_fns(p)[op], reps=args.reps, flush=flush)
                    rows.append(dict(op=op, h_out=h_out, r=r, tokens=tokens, popularity=pop,
                                     bgmv_max_seg=mode, knobs=knobs, graph_us=us))
                    results.append((us, knobs))
                if results:
                    best = min(results, key=lambda b: b[0])
                    print(f"{op:6s} {h_out:5d} r{r:<3d} T{tokens:<4d} {pop:9s} bgmv<={mode:<8d} default "
                          f"{results[0][0]:6.1f}  best {best[0]:6.1f} {best[1]}", flush=True)
    sgmv.set_tuning(**defaults)
    harness.write_jsonl("sgmv_tune", rows, setup, args.out_dir)
    return rows


def best_knobs(rows: list[dict]) -> dict:
    """Per op, the variant with the least total time over the Distinct (token tiling) and Identical cases."""
    chosen = {}
    for op in TUNE_VARIANTS:
        totals: dict[str, list] = {}
        for x in rows:
            if x["op"] == op and x["bgmv_max_seg"] == 1 and x["popularity"] in ("distinct", "identical"):
                totals.setdefault(repr(sorted(x["knobs"].items())), [x["knobs"], 0.0, 0])
                entry = totals[repr(sorted(x["knobs"].items()))]
                entry[1] += x["graph_us"]
                entry[2] += 1
        complete = [e for e in totals.values() if e[2] == max(e[2] for e in totals.values())]
        if complete:
            knobs, total, _ = min(complete, key=lambda e: e[1])
            print(f"{op}: best over the target cases {knobs} total {total:.1f} us")
            chosen = {**knobs, **chosen}  # for a knob both ops tried (max_block_m) the shrink wins
    return chosen


def profile_host(tokens: int = 64) -> None:
    """Where the Python time of one eager add-on call goes: the host floor of its parts (a bare Triton
    launch, an allocation), then cProfile over 500 calls."""
    import cProfile
    import pstats

    p = make_problem(4096, 16, tokens, "distinct")
    fn = system_fns(p)["ours"]
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    for name, us in host_floor(p, fn).items():
        print(f"host floor, {name}: {us:.1f} us", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


@triton.jit
def _empty_kernel(x):
    pass


def host_floor(p: Problem, fn) -> dict[str, float]:
    """Python time per call (the GPU not waited for) of the add-on call and of what it cannot do without:
    its shrink launch through Triton's JIT entry, through the compiled kernel, and through the bare launcher
    (`CompiledKernel.run`, no hooks: the least any Triton launch from Python costs), a launch of an empty
    one-argument kernel, and one torch.empty."""
    launches = []

    def record(kernel, grid, tensors, strides, free, tail, num_warps):
        launches.append((kernel, grid, tensors, strides, free, tail, num_warps))
        launch(kernel, grid, tensors, strides, free, tail, num_warps)

    launch, sgmv._launch = sgmv._launch, record
    try:
        fn()
    finally:
        sgmv._launch = launch
    kernel, grid, tensors, strides, free, tail, num_warps = launches[0]
    options = pdl.options(tensors[0])
    args = (*tensors, *strides, *free, *tail, options.pop("PDL"))
    compiled = kernel[grid](*args, num_warps=num_warps, **options)
    device = tensors[0].get_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    run, function, meta = compiled.run, compiled.function, compiled.packed_metadata
    empty = _empty_kernel[(1,)](p.x)
    e_run, e_function, e_meta = empty.run, empty.function, empty.packed_metadata
    return {
        "add-on call (shrink + expand)": harness.host_overhead_us(fn),
        "shrink via JITFunction": harness.host_overhead_us(
            lambda: kernel[grid](*args, num_warps=num_warps, **options)),
        "shrink via CompiledKernel[grid]": harness.host_overhead_us(lambda: compiled[grid](*args)),
        "shrink via bare launcher": harness.host_overhead_us(
            lambda: run(*grid, stream, function, meta, None, None, None, *args)),
        "empty kernel via bare launcher": harness.host_overhead_us(
            lambda: e_run(1, 1, 1, stream, e_function, e_meta, None, None, None, p.x)),
        "torch.empty([T, r] fp32)": harness.host_overhead_us(
            lambda: torch.empty(p.tokens, p.r, dtype=torch.float32, device="cuda")),
    }


def plot(rows: list[dict], out_dir: Path, h_out: int = 4096, r: int = 16) -> Path | None:
    """Latency vs tokens per popularity: backbone alone and backbone + each LoRA system (Punica's figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {x["tokens"]: x["graph_us"] for x in rows if x["system"] == "backbone" and x["h_out"] == h_out}
    pops = [p for p in POPULARITY if any(x["popularity"] == p for x in rows)]
    if not base or not pops:
        return None
    fig, axes = plt.subplots(1, len(pops), figsize=(4 * len(pops), 3.4), sharey=True, squeeze=False)
    for ax, pop in zip(axes[0], pops):
        ax.plot(sorted(base), [base[t] for t in sorted(base)], "k-o", label="backbone x@W")
        for system, style in (("loop", "C1-s"), ("gather", "C2-^"), ("ours", "C0-o")):
            pts = sorted((x["tokens"], x["graph_us"]) for x in rows if x["system"] == system and
                         x["popularity"] == pop and x["h_out"] == h_out and x["r"] == r and x["tokens"] in base)
            if pts:
                ax.plot([t for t, _ in pts], [base[t] + us for t, us in pts], style, label=f"backbone + {system}")
        ax.set_title(f"{pop}")
        ax.set_xlabel("tokens (one request each)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"us, {H_IN}->{h_out}, r={r} (graph replay)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "sgmv_backbone_vs_sgmv.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the issue's target cases, as a table")
    ap.add_argument("--tune", action="store_true", help="sweep launch knobs on the target cases (those of --h-out, "
                    "--ranks, --tokens, --popularity; the ops of --systems)")
    ap.add_argument("--profile-host", action="store_true", help="cProfile the eager Python path")
    ap.add_argument("--apply", action="store_true", help="with --tune: use the best knobs for what follows")
    ap.add_argument("--sweep", action="store_true", help="run the sweep also with --quick/--tune")
    ap.add_argument("--work-lists", action="store_true", help="default vs work-list vs hybrid tiling")
    ap.add_argument("--h-out", type=int, nargs="+", default=[4096, 11008])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--popularity", nargs="+", default=list(POPULARITY))
    ap.add_argument("--systems", nargs="+", default=["backbone", "loop", "gather", "ours", "shrink", "expand"])
    ap.add_argument("--loop-max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=150.0, help="--tune stops sweeping after this long")
    ap.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    ap.add_argument("--sgmv-tuning", nargs="*", default=(), metavar="KNOB=VALUE",
                    help="override punica.ops.sgmv.TUNING (after --tune --apply)")
    args = ap.parse_args(argv)
    setup = harness.environment()
    flush = harness.L2Flush()
    copy_bw = harness.copy_bandwidth()
    setup["copy_bw_tbps"] = round(copy_bw / 1e12, 3)
    print(f"{setup.get('gpu')}: device-to-device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    if args.profile_host:
        profile_host()
    if args.tune:
        tune_rows = run_tune(args, flush, copy_bw, setup)
        if args.apply:
            sgmv.set_tuning(**best_knobs(tune_rows))
    harness.apply_sgmv_tuning(args.sgmv_tuning)
    setup["tuning"] = dict(sgmv.TUNING)
    print(f"knobs: {sgmv.TUNING}", flush=True)
    if args.quick:
        run_quick(args, flush, copy_bw, setup)
    if args.work_lists:
        run_work_lists(args, flush, copy_bw, setup)
    if args.sweep or not (args.quick or args.tune or args.profile_host or args.work_lists):
        rows = run_sweep(args, flush, copy_bw, setup)
        path = plot(rows, args.out_dir)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
