"""Load a running `punica serve` over loopback: N concurrent streaming clients, adapters drawn from a
popularity pattern (punica.workload), every request exactly `--max-tokens` long (ignore_eos).

Reports requests/s, output tokens/s, time to first token and inter-token latency percentiles, plus the
server's adapter loads/evictions during the run (from /metrics), and appends one JSON line per run to
benchmarks/results/server_load.jsonl with the setup (git revision, versions, host).

    punica serve --model DIR --lora a=PATH ... --max-loras 4 &
    python benchmarks/bench_server_load.py --clients 16 --requests 128 --popularity zipf:1.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import environment, print_table, write_jsonl  # noqa: E402
from punica.workload import POPULARITIES, adapter_indices  # noqa: E402


@dataclass
class Result:
    """One request as the client saw it (times in seconds from its start)."""

    model: str
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    latency: float = 0.0
    tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    res, start = Result(model), time.perf_counter()
    last = start
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            res.error = f"{resp.status_code}: {(await resp.aread()).decode()[:200]}"
            return res
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[6:]), time.perf_counter()
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0]["text"]:
                if res.ttft is None:
                    res.ttft = now - start
                else:
                    res.gaps.append(now - last)
                last = now
    res.latency = time.perf_counter() - start
    return res


async def run_load(args, models: list[str]) -> tuple[list[Result], float]:
    picks = [models[i] for i in adapter_indices(args.popularity, args.requests, len(models), seed=args.seed)]
    rng = random.Random(args.seed)
    shared = [rng.randrange(args.min_token_id, args.max_token_id) for _ in range(args.shared_prefix)]
    prompts = [(shared + [rng.randrange(args.min_token_id, args.max_token_id) for _ in range(args.prompt_len)])
               [:max(args.prompt_len, args.shared_prefix + 1)] for _ in range(args.requests)]
    todo = asyncio.Queue()
    for job in zip(picks, prompts):
        todo.put_nowait(job)
    results: list[Result] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not todo.empty():
            model, prompt = todo.get_nowait()
            results.append(await one_request(client, model, prompt, args.max_tokens))

    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def server_counters(url: str, headers: dict) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    wanted = ("punica_adapter_device_loads_total", "punica_adapter_device_evictions_total",
              "punica_adapter_disk_loads_total", "punica_preemptions_total", "punica_prefix_cache_queries_total",
              "punica_prefix_cache_hits_total")
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name in wanted}


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    itl = [g * 1e3 for r in ok for g in r.gaps]
    row = {"requests": len(results), "errors": len(results) - len(ok), "elapsed_s": round(elapsed, 3),
           "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": sum(r.tokens for r in ok) / elapsed}
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("latency_ms", [r.latency * 1e3 for r in ok])):
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = pct(values, q)
    return row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (closed loop)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--popularity", default="zipf:1.5", help=f"one of {POPULARITIES} (zipf:A for any A)")
    p.add_argument("--num-adapters", type=int, help="use the first N served adapters (default: all)")
    p.add_argument("--include-base", action="store_true", help="the base model is one more 'adapter'")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (random ids)")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="the first N prompt tokens are the same in every request (a system prompt; the prefix "
                        "cache serves them per adapter)")
    p.add_argument("--min-token-id", type=int, default=10)
    p.add_argument("--max-token-id", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--seed", type=int, default=None,
                   help="draws the prompts and adapters (default: a new one each run, stored with the result: "
                        "the server's prefix cache would serve a repeated run's prompts from the last)")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. the serve command line)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2 ** 31)
    return args


def served_models(args) -> tuple[str, list[str]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    data = httpx.get(f"{args.url}/v1/models", headers=headers).raise_for_status().json()["data"]
    base = next(m["id"] for m in data if m.get("parent") is None)
    adapters = sorted(m["id"] for m in data if m.get("parent") is not None)[:args.num_adapters]
    return base, ([base] if args.include_base or not adapters else []) + adapters


def main() -> None:
    args = parse_args()
    base, models = served_models(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    before = server_counters(args.url, headers)
    results, elapsed = asyncio.run(run_load(args, models))
    after = server_counters(args.url, headers)
    row = {"bench": "server_load", "base_model": base, "num_models": len(models), "popularity": args.popularity,
           "clients": args.clients, "seed": args.seed, "prompt_len": args.prompt_len,
           "shared_prefix": args.shared_prefix, "max_tokens": args.max_tokens,
           **summarize(results, elapsed), **{k.removeprefix("punica_"): after[k] - before.get(k, 0) for k in after},
           "note": args.note}
    print_table([row], ["clients", "popularity", "num_models", "requests_per_s", "output_tokens_per_s",
                        "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "errors"])
    errors = [r.error for r in results if r.error]
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    if not args.no_record:
        print("appended to", write_jsonl("server_load", [row], environment()))


if __name__ == "__main__":
    main()
