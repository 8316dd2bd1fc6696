"""The `n` choices of one long prompt, sent together, with the prefix cache (the first choice computes the
prompt, the others wait a step and read its blocks) and without it (every choice computes the prompt).
Runs the demo model (SmolLM2-135M-Instruct) with one of its adapters, on CUDA where there is one.

    python -m benchmarks.bench_n_choices [--choices 8] [--prompt-len 640] [--max-tokens 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import environment, print_table, write_jsonl
from punica import LLM, SamplingParams
from punica.demo_model import default_model_dir, demo_adapters


def run(llm: LLM, prompt: list[int], choices: int, max_tokens: int, adapter: str) -> dict:
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True) for i in range(choices)]
    engine = llm.engine
    hits = engine.blocks.hit_tokens
    start = time.perf_counter()
    engine.add_requests([prompt] * choices, params, [adapter] * choices)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    return dict(seconds=round(seconds, 3), steps=steps, cached_prompt_tokens=engine.blocks.hit_tokens - hits)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--choices", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=640)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    ap.add_argument("--adapter", default="shakespeare")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = torch.randint(100, 40000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for i in range(2 * args.repeats):
        caching = i % 2 == 0
        llm = LLM(model=default_model_dir(), lora_modules=demo_adapters(), device=device,
                  enable_prefix_caching=caching)
        llm.generate([prompt[-20:]], SamplingParams(max_tokens=2), lora=args.adapter)  # compiles; shares no block
        rows.append(dict(prefix_cache=caching, **run(llm, prompt, args.choices, args.max_tokens, args.adapter)))
        del llm
    setup = dict(environment(), bench="n_choices", model="smollm2-135m-instruct", adapter=args.adapter,
                 choices=args.choices, prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    print_table(rows, ["prefix_cache", "seconds", "steps", "cached_prompt_tokens"])
    write_jsonl("n_choices", rows, setup, args.out_dir)


if __name__ == "__main__":
    main()
