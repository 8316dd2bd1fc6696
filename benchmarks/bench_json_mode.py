"""What structured output costs: a batch of requests on the demo model (SmolLM2-135M-Instruct, its adapters
round-robin) where none, half or all of them are in JSON-schema mode. A constrained request's mask needs the
token its last step drew: the engine reads that step while the next one's model runs, then masks and samples,
so constrained requests advance every step; this measures what that wait and the masks cost them, and whether
the unconstrained requests beside them slow down. Rates count the tokens each kind wrote (the schema needs more
than the default 32 tokens, so constrained requests run to max_tokens like the others, which ignore EOS). On
CUDA where there is one; `--random-7b`: the Llama-2-7B architecture with random weights, a byte-level test
tokenizer (so the JSON masks allow about 100 tokens) and random adapters, on the GPU without the demo model.

`--mode auto`: the constrained requests are tool_choice "auto" replies instead (SamplingParams.tool_call_auto):
free text unless they begin a call, what every chat request with tools now costs.

    python -m benchmarks.bench_json_mode [--requests 16] [--max-tokens 32] [--repeats 2] [--random-7b] [--mode auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_textgen_lora import LLAMA2_7B, write_adapters, write_model_dir
from benchmarks.harness import environment, print_table, write_jsonl
from punica import LLM, SamplingParams
from punica.demo_model import default_model_dir, demo_adapters
from punica.testing import write_byte_tokenizer

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer"},
    "scenes": {"type": "array", "minItems": 3, "items": {"type": "object", "properties": {
        "place": {"type": "string"}, "lines": {"type": "array", "minItems": 2, "items": {"type": "string"}}}}}}}
TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}}}
PROMPT = ("<|im_start|>user\nWrite a short play as JSON: a title, a year, and its scenes.<|im_end|>\n"
          "<|im_start|>assistant\n")


def run(llm: LLM, prompt: str | list[int], names: list[str], requests: int, constrained: int,
        max_tokens: int, mode: str = "schema") -> dict:
    """`constrained` of the `requests` in JSON-schema mode (or "auto" tool-call replies); seconds, steps and tokens
    per second of each kind."""
    kind = "json" if mode == "schema" else "auto"
    extra = dict(json_schema=SCHEMA) if mode == "schema" else dict(tool_call=TOOLS, tool_call_auto=True)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True,
                             **(extra if i < constrained else {})) for i in range(requests)]
    engine = llm.engine
    start = time.perf_counter()
    ids = engine.add_requests([prompt] * requests, params, [names[i % len(names)] for i in range(requests)])
    done, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out, time.perf_counter() - start)
        steps += 1
    seconds = time.perf_counter() - start
    kinds = {kind: ids[:constrained], "plain": ids[constrained:]}
    row = dict(requests=requests, constrained=constrained, mode=mode, wait="read during the model",
               seconds=round(seconds, 3), steps=steps)
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
    ap.add_argument("--random-7b", action="store_true", help="Llama-2-7B shapes, random weights (CUDA)")
    ap.add_argument("--mode", choices=("schema", "auto"), default="schema",
                    help='the constrained requests: JSON-schema mode, or tool_choice "auto" replies')
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_7b:
            model_dir = write_model_dir(Path(tmp), LLAMA2_7B)
            write_byte_tokenizer(model_dir)
            adapters = write_adapters(Path(tmp), LLAMA2_7B, 4, 16)
            prompt, model = list(range(3, 403)), "llama-2-7b-random"
        else:
            model_dir, adapters, prompt, model = default_model_dir(), demo_adapters(), PROMPT, "smollm2-135m-instruct"
        llm = LLM(model=model_dir, lora_modules=adapters, device=device, enable_prefix_caching=False,
                  max_num_seqs=max(args.requests, 4), **({"load_format": "dummy"} if args.random_7b else {}))
        names = list(adapters)
        run(llm, prompt, names, 4, 2, 4, args.mode)  # warm-up: compiles, builds the vocabulary's tries, first masks
        rows += [run(llm, prompt, names, args.requests, c, args.max_tokens, args.mode) for _ in range(args.repeats)
                 for c in (0, args.requests // 2, args.requests)]
        del llm
    setup = dict(environment(), bench="json_mode", model=model, max_tokens=args.max_tokens, device=device)
    kind = "json" if args.mode == "schema" else "auto"
    print_table(rows, ["requests", "constrained", "seconds", "steps", f"{kind}_tokens", f"{kind}_s_mean",
                       f"{kind}_tok_per_s", "plain_tokens", "plain_s_mean", "plain_tok_per_s"])
    write_jsonl("json_mode", rows, setup, args.out_dir)


if __name__ == "__main__":
    main()
