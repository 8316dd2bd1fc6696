"""What structured output costs: a batch of requests on the demo model (SmolLM2-135M-Instruct, its adapters
round-robin) where none, half or all of them are in JSON-schema mode. A constrained request is not scheduled
while its last token is on the device (its next mask needs it), so it advances every other step; this measures
what that and the masks cost it, and whether the unconstrained requests beside it slow down. Rates count the
tokens each kind wrote (the schema needs more than the default 32 tokens, so constrained requests run to
max_tokens like the others, which ignore EOS). On CUDA where there is one.

    python -m benchmarks.bench_json_mode [--requests 16] [--max-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import environment, print_table, write_jsonl
from punica import LLM, SamplingParams
from punica.demo_model import default_model_dir, demo_adapters

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer"},
    "scenes": {"type": "array", "minItems": 3, "items": {"type": "object", "properties": {
        "place": {"type": "string"}, "lines": {"type": "array", "minItems": 2, "items": {"type": "string"}}}}}}}
PROMPT = ("<|im_start|>user\nWrite a short play as JSON: a title, a year, and its scenes.<|im_end|>\n"
          "<|im_start|>assistant\n")


def run(llm: LLM, requests: int, constrained: int, max_tokens: int) -> dict:
    """`constrained` of the `requests` in JSON-schema mode; seconds, steps and tokens per second of each kind."""
    names = list(demo_adapters())
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True,
                             json_schema=SCHEMA if i < constrained else None) for i in range(requests)]
    engine = llm.engine
    start = time.perf_counter()
    ids = engine.add_requests([PROMPT] * requests, params, [names[i % len(names)] for i in range(requests)])
    done, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out, time.perf_counter() - start)
        steps += 1
    seconds = time.perf_counter() - start
    kinds = {"json": ids[:constrained], "plain": ids[constrained:]}
    row = dict(requests=requests, constrained=constrained, seconds=round(seconds, 3), steps=steps)
    for kind, rids in kinds.items():
        if rids:
            tokens = sum(len(done[r][0].token_ids) for r in rids)
            row[f"{kind}_tokens"] = tokens
            row[f"{kind}_s_mean"] = round(sum(done[r][1] for r in rids) / len(rids), 3)
            row[f"{kind}_tok_per_s"] = round(tokens / max(done[r][1] for r in rids), 1)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mix, in turn")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(model=default_model_dir(), lora_modules=demo_adapters(), device=device, enable_prefix_caching=False)
    run(llm, 4, 2, 4)  # warm-up: compiles, builds the vocabulary's tries and the schema's first masks
    rows = [run(llm, args.requests, c, args.max_tokens) for _ in range(args.repeats)
            for c in (0, args.requests // 2, args.requests)]
    setup = dict(environment(), bench="json_mode", model="smollm2-135m-instruct", max_tokens=args.max_tokens,
                 device=device)
    print_table(rows, ["requests", "constrained", "seconds", "steps", "json_tokens", "json_s_mean", "json_tok_per_s",
                       "plain_tokens", "plain_s_mean", "plain_tok_per_s"])
    write_jsonl("json_mode", rows, setup, args.out_dir)


if __name__ == "__main__":
    main()
