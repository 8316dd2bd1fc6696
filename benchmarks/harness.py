"""What every benchmark shares: the setup record (GPU, git revision, versions) written with each result as
JSON lines under benchmarks/results/, CUDA-event timing (median over many reps, L2 flushed before each
rep, eager and CUDA-graph replay), host-side launch overhead, and the device-to-device copy bandwidth
that achieved bandwidth is reported against."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_revision() -> str:
    """HEAD (+ "-dirty"); PUNICA_GIT_REV wins, for copies of the tree without .git (the device machine)."""
    if os.environ.get("PUNICA_GIT_REV"):
        return os.environ["PUNICA_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS.parent).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """The setup recorded with every result."""
    env = dict(git=git_revision(), torch=torch.__version__, python=platform.python_version(),
               host=platform.node(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", 0),
                   cuda=torch.version.cuda)
    return env


class L2Flush:
    """Writes a buffer twice the size of L2 so the next kernel starts from cold caches."""

    def __init__(self, device: torch.device | str = "cuda"):
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        self.buffer = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def _median_us(fn: Callable[[], None], reps: int, flush: Callable[[], None] | None) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def time_eager(fn: Callable[[], None], reps: int = 100, warmup: int = 5, flush: L2Flush | None = None) -> float:
    """Median GPU time of fn() in microseconds (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    return _median_us(fn, reps, flush)


def capture(fn: Callable[[], None], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """fn() captured in a CUDA graph, after warm-up calls on a side stream (as torch requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(fn: Callable[[], None], reps: int = 100, flush: L2Flush | None = None) -> float:
    """Median GPU time of one replay of fn() captured in a CUDA graph, in microseconds."""
    graph = capture(fn)
    graph.replay()
    result = _median_us(graph.replay, reps, flush)
    del graph
    return result


def host_overhead_us(fn: Callable[[], None], calls: int = 200) -> float:
    """Python-side time per call (launches are asynchronous; the GPU is not waited for)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = time_eager(lambda: dst.copy_(src), reps=reps, warmup=3)
    return 2 * nbytes / (us * 1e-6)


def write_jsonl(name: str, rows: list[dict], setup: dict, out_dir: Path | None = None) -> Path:
    """Append rows (each merged with `setup`) to <out_dir or results>/<name>.jsonl."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**setup, **row}) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A fixed-width table of the given columns (floats to one decimal)."""
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def apply_sgmv_tuning(pairs: list[str] | None) -> dict[str, float]:
    """`--sgmv-tuning name=value ...`: override punica.ops.sgmv.TUNING knobs for this run (recorded in the
    setup of every result); values are ints, or fractions such as sparse_decode=0.5."""
    from punica.ops.sgmv import set_tuning
    knobs = parse_tuning(pairs or [])
    set_tuning(**knobs)
    return knobs


def parse_tuning(pairs: list[str]) -> dict[str, float | str]:
    """["name=value", ...] -> {name: value}; values are ints, fractions such as sparse_decode=0.5, or else words."""
    knobs = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            knobs[name] = float(value) if "." in value else int(value)
        except ValueError:
            knobs[name] = value
    return knobs


def add_engine_knobs(ap: argparse.ArgumentParser) -> None:
    """The engine's kernel switches, for benchmarks that run the whole model (A/Bs of one knob each)."""
    flag = argparse.BooleanOptionalAction
    ap.add_argument("--sgmv-tuning", nargs="*", metavar="KNOB=VALUE", help="override punica.ops.sgmv.TUNING")
    ap.add_argument("--pdl", action=flag, default=True, help="programmatic dependent launch (ops/pdl.py)")
    ap.add_argument("--triton-gemm", action=flag, default=True,
                    help="the Triton GEMM on the projections where it measured faster (ops/gemm.py)")
    ap.add_argument("--triton-gemm-beside-lora", action=flag, default=True,
                    help="that GEMM also as the base of projections with LoRA in the step (gemm.BESIDE_LORA)")
    ap.add_argument("--gemm-config", default=None, metavar="JSON", help="tiles and shapes saved by bench_gemm")
    ap.add_argument("--unfused", action="store_true",
                    help="rope and the KV store as two kernels, LoRA deltas added on their own (llama.FUSIONS)")
    ap.add_argument("--fuse-qk-norm", action=flag, default=True,
                    help="Qwen3's q/k norms inside rope_store_kv, not kernels of their own (llama.FUSIONS)")
    ap.add_argument("--decode-order", action=flag, default=True,
                    help="decode graphs start attention programs longest context first (cuda_graph.DECODE_ORDER)")
    ap.add_argument("--delta-overwrite", action=flag, default=True,
                    help="the side-stream LoRA delta written by the expand, no zero-fill (layers.DELTA_OVERWRITE)")
    ap.add_argument("--split-mixed-attention", action=flag, default=True,
                    help="mixed steps run their decodes on the decode attention kernel (attention.SPLIT_MIXED)")
    ap.add_argument("--overlap-mixed-attention", action=flag, default=True,
                    help="those two attention kernels on two streams (attention.OVERLAP_MIXED)")
    ap.add_argument("--decode-kv-as-a", choices=["never", "fp8", "always"], default=None,
                    help="caches the decode attention reads as its dots' first operand (attention.DECODE_KV_AS_A)")
    ap.add_argument("--side-stream-max-tokens", type=int, default=None, metavar="N",
                    help="steps of at most N tokens run LoRA beside the GEMM (layers.SIDE_STREAM_MAX_TOKENS)")
    ap.add_argument("--delta-first-min-tokens", type=int, default=None, metavar="N",
                    help="steps of more than N tokens on the main stream write the LoRA delta first and let the "
                         "GEMM add to it (layers.DELTA_FIRST_MIN_TOKENS)")


def apply_engine_knobs(args: argparse.Namespace) -> dict:
    """Set what add_engine_knobs parsed; returns it for the setup record of every result."""
    from punica.engine import cuda_graph
    from punica.model import layers, llama
    from punica.ops import attention, gemm, pdl

    tuning = apply_sgmv_tuning(args.sgmv_tuning)
    pdl.set_pdl(args.pdl)
    if args.gemm_config:
        gemm.load_config(args.gemm_config)
    if not args.triton_gemm:
        gemm.PLAIN_SHAPES.clear()
    gemm.BESIDE_LORA = args.triton_gemm_beside_lora
    if args.unfused:
        llama.FUSIONS.update(rope_store_kv=False, qk_norm=False, fold_delta=False)
    llama.FUSIONS["qk_norm"] &= args.fuse_qk_norm
    cuda_graph.DECODE_ORDER, layers.DELTA_OVERWRITE = args.decode_order, args.delta_overwrite
    attention.SPLIT_MIXED, attention.OVERLAP_MIXED = args.split_mixed_attention, args.overlap_mixed_attention
    if args.decode_kv_as_a is not None:
        attention.DECODE_KV_AS_A = args.decode_kv_as_a
    if args.side_stream_max_tokens is not None:
        layers.SIDE_STREAM_MAX_TOKENS = args.side_stream_max_tokens
    if args.delta_first_min_tokens is not None:
        layers.DELTA_FIRST_MIN_TOKENS = args.delta_first_min_tokens
    return dict(sgmv_tuning=tuning, pdl=args.pdl, triton_gemm=sorted(gemm.PLAIN_SHAPES),
                triton_gemm_beside_lora=gemm.BESIDE_LORA, fusions=dict(llama.FUSIONS),
                decode_order=args.decode_order, delta_overwrite=args.delta_overwrite,
                split_mixed_attention=args.split_mixed_attention, overlap_mixed_attention=args.overlap_mixed_attention,
                decode_kv_as_a=attention.DECODE_KV_AS_A,
                side_stream_max_tokens=layers.SIDE_STREAM_MAX_TOKENS,
                delta_first_min_tokens=layers.DELTA_FIRST_MIN_TOKENS,
                gemm_tiles=[[*k, v] for k, v in gemm.SHAPES.items()])
