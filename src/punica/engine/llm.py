"""Offline batched generation: `LLM(model=...).generate(prompts, params, lora=[...])`, or `.chat(conversations,
...)` through the model's chat template."""

from __future__ import annotations

import dataclasses
import sys
import time

from punica.engine.engine import STALLED_WAIT_S, Engine
from punica.engine.request import RequestOutput, SamplingParams
from punica.errors import BadRequestError


class LLM:
    """One base model plus named LoRA adapters, generating for many prompts at once.

    `options` are engine options by name (dtype, device, backend, max_loras, max_lora_rank, block_size,
    num_blocks, max_num_seqs, max_num_batched_tokens, max_model_len, enforce_eager, ...).
    """

    def __init__(self, model: str, lora_modules: dict[str, str] | None = None, **options):
        self.engine = Engine.from_args(model, lora_modules, **options)

    def add_lora(self, name: str, path: str) -> None:
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 lora: list[str | None] | str | None = None, progress: bool | None = None) -> list[RequestOutput]:
        """Outputs in prompt order. `prompts`: texts or token-id lists (one text alone is one prompt).
        `params` and `lora`: one per prompt (a list), or one for all."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        each = params if isinstance(params, list) else [params] * len(prompts)
        if not len(loras) == len(each) == len(prompts):
            raise BadRequestError(f"got {len(loras)} lora entries and {len(each)} params for {len(prompts)} prompts")
        ids = self.engine.add_requests(prompts, each, loras)
        try:
            return self._run(ids, progress if progress is not None else len(ids) >= 64)
        except BaseException:  # an error or Ctrl-C: stop this call's requests so the next call starts clean
            for rid in ids:
                self.engine.abort(rid)
            raise

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None,
             lora: list[str | None] | str | None = None, progress: bool | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Replies in conversation order. `conversations`: one conversation (a list of {"role", "content"}
        messages) or a list of them, each rendered by the model's chat template (with `chat_template_kwargs` as
        more variables, e.g. {"enable_thinking": False}); the template's end-of-turn token ends a reply like EOS
        (unless ignore_eos). `params` and `lora` as in `generate`."""
        tok = self.engine.tokenizer
        if tok is None:
            raise BadRequestError("chat needs the model's tokenizer.json and its chat template")
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        each = params if isinstance(params, list) else [params or SamplingParams()] * len(convs)
        each = [p if p.ignore_eos else dataclasses.replace(p, stop_token_ids=(*p.stop_token_ids, *tok.end_of_turn))
                for p in each]
        return self.generate([tok.chat_ids(c, template_kwargs=chat_template_kwargs) for c in convs], each, lora,
                             progress)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        start, tokens = time.perf_counter(), 0
        while len(done) < len(ids):
            outs = self.engine.step()
            for out in outs:
                tokens += len(out.new_token_ids)
                if out.finished:
                    done[out.request_id] = out
            if not outs and not self.engine.num_running:  # the queue waits on adapter reads: let them run
                time.sleep(STALLED_WAIT_S)
            if progress:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                print(f"\r{len(done)}/{len(ids)} done, {tokens} tokens, {rate:.1f} tok/s", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        return [done[rid] for rid in ids]
