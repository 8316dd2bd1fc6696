"""Where a step's GPU time goes when LoRA runs beside the base model, from a torch-profiler chrome trace.

A sweep over the kernels' intervals splits the step's span into time when only LoRA kernels run (LoRA on the
critical path, if the base model's kernels form a chain), only base kernels, both at once, or nothing (idle:
launch gaps and waits). Run on a saved trace:

    python -m benchmarks.trace_overlap TRACE.json
"""

from __future__ import annotations

import json
import sys

# kernels of the LoRA side chain (the zero-fill of its delta included); everything else is the base model
LORA_KERNELS = ("_shrink_kernel", "_expand_kernel", "FillFunctor")


def kernel_intervals(trace: dict) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every GPU kernel in a chrome trace (torch.profiler's export)."""
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") == "kernel"]


def overlap_summary(kernels: list[tuple[float, float, str]], lora: tuple[str, ...] = LORA_KERNELS) -> dict:
    """Microseconds of the span with only LoRA kernels running, only base ones, both, and none; plus the
    summed kernel time of each kind."""
    if not kernels:
        return dict(span_us=0.0, lora_only_us=0.0, base_only_us=0.0, both_us=0.0, idle_us=0.0,
                    lora_kernel_us=0.0, base_kernel_us=0.0)
    points = []
    for start, end, name in kernels:
        kind = int(any(p in name for p in lora))  # 1: LoRA, 0: base
        points += [(start, 1, kind), (end, -1, kind)]
    points.sort(key=lambda p: (p[0], p[1]))  # at equal times, ends before starts
    active = [0, 0]
    out = dict(lora_only_us=0.0, base_only_us=0.0, both_us=0.0, idle_us=0.0)
    last = points[0][0]
    for t, delta, kind in points:
        if t > last:
            key = ("both_us" if active[0] and active[1] else "lora_only_us" if active[1] else
                   "base_only_us" if active[0] else "idle_us")
            out[key] += t - last
            last = t
        active[kind] += delta
    sums = [0.0, 0.0]
    for start, end, name in kernels:
        sums[int(any(p in name for p in lora))] += end - start
    span = max(e for _, e, _ in kernels) - min(s for s, _, _ in kernels)
    return dict(span_us=round(span, 1), **{k: round(v, 1) for k, v in out.items()},
                lora_kernel_us=round(sums[1], 1), base_kernel_us=round(sums[0], 1))


def main(argv: list[str] | None = None) -> None:
    for path in argv if argv is not None else sys.argv[1:]:
        with open(path) as f:
            print(path, overlap_summary(kernel_intervals(json.load(f))))


if __name__ == "__main__":
    main()
