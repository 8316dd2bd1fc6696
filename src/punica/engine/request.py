"""Requests: sampling parameters, the per-sequence state the engine tracks, and what it reports back."""

from __future__ import annotations

import enum
import itertools
import json
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

from punica.config import is_int, is_number
from punica.engine.json_mode import TokenGrammar
from punica.engine.json_regex import escape
from punica.engine.json_schema import CALL_SHAPES
from punica.errors import BadRequestError

SEED_MIN, SEED_END = -2 ** 63, 2 ** 64  # the seeds torch.Generator.manual_seed takes
MAX_LOGIT_BIAS = 100.0  # |bias| added to a token's logit at most (OpenAI's range)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| at most (OpenAI's range)
MAX_LOGPROBS = 20  # most likely tokens reported beside each generated one at most (OpenAI's limit too)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Invalid values raise BadRequestError."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    # the first min_tokens draws cannot be EOS (unless ignore_eos) or a stop_token_id, and stop strings are not
    # looked for in them (vLLM's min_tokens); max_tokens still ends the output
    min_tokens: int = 0
    # a stop string that ends the output stays in its text (vLLM's include_stop_str_in_output)
    include_stop_str_in_output: bool = False
    # special tokens (EOS, chat markers) are left out of the output's text (vLLM's skip_special_tokens)
    skip_special_tokens: bool = True
    # None: no log-probabilities; k: each generated token's, and the k most likely tokens' (TokenLogprobs)
    logprobs: int | None = None
    # the same for the prompt's tokens, each given those before it (RequestOutput.prompt_logprobs)
    prompt_logprobs: int | None = None
    # {token id: bias} added to those tokens' logits before the draw (not to the reported logprobs); kept as
    # ((id, bias), ...) sorted by id, so the params stay hashable
    logit_bias: dict[int, float] | tuple[tuple[int, float], ...] | None = None
    # subtracted from the logit of each token the request has generated: once (presence), per time (frequency)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # logits of tokens in the prompt or generated so far: divided by it where positive, multiplied where
    # negative (transformers' and vLLM's repetition_penalty; 1 = none)
    repetition_penalty: float = 1.0
    # drop tokens less than min_p times as likely as the most likely one, after temperature (0 = none)
    min_p: float = 0.0
    # JSON mode: only tokens that keep the output a prefix of one JSON object are drawn, and the request stops
    # when the object closes, not at a stop string (engine/json_mode.py); so do the two below
    json_object: bool = False
    # JSON-schema mode: the same for one value of this JSON schema (a dict, kept as its JSON text;
    # engine/json_schema.py)
    json_schema: str | dict | None = None
    # one call of one of these tools ({name: JSON schema of its arguments}, kept as JSON text): the output is a
    # name, a space, then that tool's arguments, one value of its schema (json_schema.ToolCallGrammar)
    tool_call: str | dict | None = None
    # how that call is written (json_schema.CALL_SHAPES): "punica" as above, "hermes" as Qwen2's and Hermes' chat
    # templates ask (`<tool_call>`, a JSON object of the name and the arguments, `</tool_call>`), "llama3" as Llama
    # 3.1's (a JSON object of the name and the "parameters")
    tool_call_shape: str = "punica"
    # the reply may be such a call or free text (tool_choice "auto"): a reply that begins a call is one, whole and
    # valid (json_schema.AutoCallGrammar); stop strings apply to free text
    tool_call_auto: bool = False
    # the whole output matches this regular expression (engine/json_regex.py: ECMA's, without backreferences,
    # lookarounds or word boundaries), or is one of these strings; it may end (EOS, stop_token_ids) where it
    # could match, and ends where nothing could follow (vLLM's guided_regex, guided_choice)
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None

    def __post_init__(self):
        def bad(msg: str) -> None:
            raise BadRequestError(msg)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (both: no limit) or a positive integer, got {self.top_k!r}")
        if self.seed is not None:
            if not is_int(self.seed) or not SEED_MIN <= self.seed < SEED_END:
                bad(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
            object.__setattr__(self, "seed", self.seed % SEED_END)  # -1 and 2**64 - 1 seed alike, as in torch
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            bad(f"stop must be a string or a list of strings, got {self.stop!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in ids)):
            bad(f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                bad(f"{name} must be an integer from 0 to {MAX_LOGPROBS} (the most likely tokens reported beside "
                    f"each token), or None, got {k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not abs(value) <= MAX_PENALTY:
                bad(f"{name} must be a number from -{MAX_PENALTY:g} to {MAX_PENALTY:g}, got {value!r}")
        if not is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            bad(f"repetition_penalty must be a finite number > 0 (1: none), got {self.repetition_penalty!r}")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.json_object, bool):
            bad(f"json_object must be true or false, got {self.json_object!r}")
        if self.json_schema is not None:
            if self.json_object:
                bad("json_object and json_schema exclude each other: give one")
            schema = _as_json_text(self, "json_schema", "a JSON schema object")
            if not isinstance(schema, dict):
                bad(f"json_schema must be a JSON schema object, got {type(schema).__name__}")
        if self.tool_call is not None:
            if self.json_object or self.json_schema is not None:
                bad("tool_call excludes json_object and json_schema: give one")
            tools = _as_json_text(self, "tool_call", "a map of tool names to JSON schemas")
            if not isinstance(tools, dict) or not tools or not all(
                    isinstance(k, str) and k and " " not in k and '"' not in k and isinstance(v, dict)
                    for k, v in tools.items()):
                bad(f"tool_call must map tool names (non-empty, without spaces or quotes) to JSON schemas, got "
                    f"{tools!r}")
        if self.tool_call_auto and self.tool_call is None:
            bad("tool_call_auto needs tool_call: the tools the reply may call")
        if self.tool_call_shape not in CALL_SHAPES:
            bad(f"tool_call_shape must be one of {', '.join(CALL_SHAPES)}, got {self.tool_call_shape!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                    isinstance(c, str) and c for c in self.choice):
                bad(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.regex is not None and not isinstance(self.regex, str):
            bad(f"regex must be a string, got {self.regex!r}")
        modes = [name for name in ("json_object", "json_schema", "tool_call", "regex", "choice")
                 if getattr(self, name) not in (None, False)]
        if modes and self.min_tokens:  # the grammar may need to end sooner than min_tokens lets it
            bad(f"min_tokens cannot be combined with constrained output ({modes[0]}): the output ends where its value "
                "does")
        if len(modes) > 1 and (self.regex is not None or self.choice is not None):
            bad(f"{' and '.join(modes)} exclude each other: give one")
        bias = self.logit_bias
        pairs = (list(bias.items()) if isinstance(bias, dict) else list(bias) if isinstance(bias, (tuple, list))
                 else [] if bias is None else None)
        if pairs is None or not all(isinstance(p, (tuple, list)) and len(p) == 2 and is_int(p[0]) and p[0] >= 0
                                    and is_number(p[1]) and abs(p[1]) <= MAX_LOGIT_BIAS for p in pairs):
            bad(f"logit_bias must map token ids (integers >= 0) to numbers from -{MAX_LOGIT_BIAS:g} to "
                f"{MAX_LOGIT_BIAS:g}, got {bias!r}")
        object.__setattr__(self, "logit_bias", tuple(sorted((t, float(b)) for t, b in pairs)) or None)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(ids or ()))

    @property
    def grammar_key(self) -> str | None:
        """What the grammar masking this request's draws is built from (None: unconstrained)."""
        if self.json_object:
            return "json_object"
        if self.json_schema is not None:
            return "schema:" + self.json_schema
        if self.tool_call is not None:
            return f"{'auto' if self.tool_call_auto else 'tools'}:{self.tool_call_shape}:{self.tool_call}"
        if self.regex is None and self.choice is None:
            return None
        pattern = self.regex if self.choice is None else "|".join(escape(c) for c in self.choice)
        return "regex:" + json.dumps([pattern, sorted(set(self.stop_token_ids))])

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _as_json_text(params: SamplingParams, name: str, what: str):
    """Field `name` (a JSON value or its text) kept as its JSON text, which is hashable and keeps an object's
    keys in order; returns the value."""
    value = getattr(params, name)
    try:
        value = json.loads(value) if isinstance(value, str) else value
        object.__setattr__(params, name, json.dumps(value))
    except (TypeError, ValueError) as e:
        raise BadRequestError(f"{name} must be {what}: {e}") from None
    return value


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model's distribution (log_softmax of its logits, before
    temperature, top-k and top-p), and the `SamplingParams.logprobs` most likely tokens' (id, logprob), most
    likely first."""

    token_id: int
    logprob: float | None  # None: a prompt's first token, which nothing precedes
    top: tuple[tuple[int, float], ...] = ()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's state. `tokens` = prompt + generated; KV is stored for the first `num_computed`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lora: str | None = None
    # the adapter load it runs on (AdapterManager.ref): its name, unless the name was reloaded meanwhile
    lora_key: str | None = None
    # what besides its tokens its KV depends on (the adapter load), for the prefix cache (block_keys)
    cache_namespace: Hashable = None
    num_cached_blocks: int = 0  # leading blocks of block_table taken from or registered in the cache
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache when it first started
    # longrope models: (its first position rotated by the long-context factors, their rows' offset in the rope
    # table): 0 once the sequence is longer than the pretraining length, which is the position a shorter one
    # switches at (use_long_rope), as transformers' generate does
    rope_long: tuple[int, int] | None = None
    block_keys: list[tuple] = field(default_factory=list)  # block_keys of its leading full known blocks
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    slot: int = 0
    status: Status = Status.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))
    finish_reason: str | None = None
    text: str = ""
    detok_prefix: int = -1  # incremental detokenization window, as indices into tokens (Tokenizer.decode_delta)
    detok_read: int = -1
    num_preemptions: int = 0
    num_bypassed: int = 0  # requests that started before this one while it waited for an adapter slot
    # tokens sampled by steps still running on the device: placeholders (-1 - row of that step's samples)
    # at the end of `tokens`, replaced in order as their steps finish
    num_pending: int = 0
    finishing: bool = False  # its last pending token reaches max_tokens / max_model_len: not scheduled again
    logprobs: list[TokenLogprobs] | None = None  # one per known generated token, when the params ask for them
    # one per prompt token when the params ask for them, filled in as prefill chunks are read (None: not yet)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # JSON, JSON-schema, tool-call and regex modes: the grammar (json_mode.TokenGrammar) and its state after the
    # known tokens. The next draw's mask depends on that state: a step whose sequences wait for their last token
    # reads the step before once its model is launched (ModelRunner.launch)
    grammar: TokenGrammar | None = None
    grammar_state: Hashable = None
    grammar_error: str | None = None  # no token of the vocabulary continues the state: the request fails with it

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt_ids)
        if self.lora_key is None:
            self.lora_key = self.lora
        if self.detok_read < 0:  # the output starts after the prompt
            self.detok_prefix = self.detok_read = len(self.prompt_ids)
        if self.logprobs is None and self.params.logprobs is not None:
            self.logprobs = []
        if self.prompt_logprobs is None and self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [TokenLogprobs(self.prompt_ids[0], None)] + [None] * (len(self.prompt_ids) - 1)

    @property
    def output_ids(self) -> list[int]:
        """Generated tokens known on the host (pending ones excluded)."""
        return self.tokens[len(self.prompt_ids):len(self.tokens) - self.num_pending]

    @property
    def num_known(self) -> int:
        """Prompt and generated tokens known on the host."""
        return len(self.tokens) - self.num_pending

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV is not yet computed (1 for a decode)."""
        return len(self.tokens) - self.num_computed

    def use_long_rope(self) -> None:
        """Rotate every position by longrope's long-context factors from now on (rope_long). Its KV then differs
        from a shorter sequence's with the same tokens, so its prefix-cache blocks are its own (cache_namespace);
        KV computed before must be recomputed (Scheduler.preempt)."""
        self.rope_long = (0, self.rope_long[1])
        self.cache_namespace = (self.cache_namespace, "long rope")
        self.block_keys = []


@dataclass
class RequestOutput:
    """A request's progress after a step: everything generated so far plus what this step added."""

    request_id: str
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    lora: str | None = None
    error: str | None = None
    # with SamplingParams.logprobs: one per token of token_ids, and those of new_token_ids
    logprobs: list[TokenLogprobs] | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    # with SamplingParams.prompt_logprobs, once the prompt is computed: one per prompt token (the first has
    # logprob None); the sequence's own list, not a copy
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0  # of its prompt, read from the prefix cache instead of computed, when it started
