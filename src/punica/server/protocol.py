"""HTTP schemas of the OpenAI-compatible API (the subset Punica serves) and OpenAI's error body.

Requests accept OpenAI's field names; unknown fields are ignored, fields Punica cannot honor are refused
with a 400 that names them. `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `min_tokens`,
`include_stop_str_in_output`, `skip_special_tokens`, `truncate_prompt_tokens`, `guided_regex` and `guided_choice` are
accepted as vLLM-style extensions (the openai client sends them through `extra_body`).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from punica import BadRequestError, SamplingParams
from punica.engine.request import MAX_LOGPROBS, SEED_END, SEED_MIN

COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens (OpenAI's default)
FORMATS = ("text", "json_object", "json_schema")  # response_format types served
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}  # a function whose `parameters` are left out


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_unicode(value: Any, name: str) -> None:
    """BadRequestError if a string in `value` (nested lists, dicts, models) holds an unpaired surrogate
    (JSON's "\\udfff" escape), which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequestError(f"{name} contains invalid Unicode (an unpaired surrogate at character "
                                  f"{exc.start}); send valid UTF-16 pairs or UTF-8 text") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_unicode(item, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, name)
            check_unicode(item, name)
    elif isinstance(value, BaseModel):
        check_unicode(value.model_dump(), name)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """`include_usage`: send one last chunk with the token counts (and empty `choices`)."""

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True)  # as OpenAI: "3" is no integer, true no number

    model: str
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # keep only the prompt's last this many tokens (vLLM's truncate_prompt_tokens)
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    # {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
    # (SamplingParams.json_object, .json_schema); other types are refused
    response_format: dict | None = None
    # the whole output matches this regular expression, or is one of these strings (SamplingParams.regex, .choice)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    # tool calls (chat only: ChatCompletionRequest.tool_use); completions refuse them by name (unsupported)
    tool_choice: Any = None
    # OpenAI fields Punica cannot honor: accepted by the schema only to be refused by name (unsupported)
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _valid_unicode(self):
        for name in ("prompt", "messages", "stop"):
            check_unicode(getattr(self, name, None), name)
        return self

    def unsupported(self) -> list[str]:
        """Names of set fields whose meaning Punica does not implement."""
        bad = [f for f in ("functions", "function_call") if getattr(self, f)]
        if self.response_format and self.response_format.get("type", "text") not in FORMATS:
            bad.append(f"response_format of type {self.response_format.get('type')!r} (served: {', '.join(FORMATS)})")
        if self.tool_choice not in (None, "none"):
            bad.append("tool_choice")
        if self.parallel_tool_calls:
            bad.append("parallel_tool_calls")
        return bad

    def sampling_params(self, max_tokens: int, choice: int, end_of_turn: tuple[int, ...] = ()) -> SamplingParams:
        """The engine's parameters for choice `choice` of `n` (seeded choices get seed + choice, so they
        differ from each other yet repeat across calls). `end_of_turn`: the chat template's end token(s),
        which stop generation like EOS unless `ignore_eos`."""
        bad = self.unsupported()
        if bad:
            raise BadRequestError(f"unsupported parameter(s): {', '.join(bad)}; Punica does not implement them, so "
                                  "remove them from the request")
        defaults = SamplingParams()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            min_p=defaults.min_p if self.min_p is None else self.min_p,
            repetition_penalty=defaults.repetition_penalty if self.repetition_penalty is None
            else self.repetition_penalty,
            seed=None if self.seed is None else (self.seed + choice) % SEED_END,
            stop=self.stop, stop_token_ids=[*(self.stop_token_ids or ()), *(() if self.ignore_eos else end_of_turn)],
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logit_bias=self.token_bias(),
            logprobs=self.num_logprobs,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            prompt_logprobs=self.num_logprobs if self.echoes else None, **self.json_mode())

    def json_mode(self) -> dict:
        """SamplingParams' json_object / json_schema from `response_format`, or its regex / choice."""
        kind = (self.response_format or {}).get("type")
        guided = self.guided()
        if guided and kind in ("json_object", "json_schema"):
            raise BadRequestError(f"{' and '.join(f'guided_{k}' for k in guided)} and response_format {kind!r} "
                                  "exclude each other: give one")
        if guided:
            return guided
        if kind == "json_object":
            return {"json_object": True}
        if kind != "json_schema":
            return {}
        spec = self.response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequestError('response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                                  '"schema": {...}}')
        return {"json_schema": spec["schema"]}

    def guided(self) -> dict:
        """SamplingParams' regex / choice from guided_regex / guided_choice ({} when neither is given)."""
        return {k: v for k, v in (("regex", self.guided_regex), ("choice", self.guided_choice)) if v is not None}

    def token_bias(self) -> dict[int, float] | None:
        """`logit_bias` with its keys (JSON object keys are strings) as token ids."""
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise BadRequestError(f"logit_bias keys must be token ids, got {list(self.logit_bias)!r}") from None

    @property
    def echoes(self) -> bool:
        """The response repeats the prompt before the completion (and its logprobs before theirs)."""
        return False

    @property
    def scores_only(self) -> bool:
        """The response holds the prompt alone, nothing generated."""
        return False

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None, or how many most likely tokens to report beside each generated one."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: text, a list of texts, token ids, or a list of token-id lists;
    each prompt gets `n` choices (choice index = prompt index * n + j). `max_tokens` defaults to 16, also
    when sent as null (OpenAI's default), clipped to the context."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    echo: bool = False  # the prompt, then the completion; with logprobs, the prompt tokens' logprobs first
    # each generated token's logprob and the `logprobs` most likely tokens' (OpenAI's legacy shape)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    top_logprobs: int | None = None  # a chat field: refused here by name rather than ignored

    @property
    def requested_max_tokens(self) -> int:
        return COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def scores_only(self) -> bool:  # `echo` with max_tokens 0: the prompt and its logprobs (scoring a text)
        return self.echo and self.max_tokens == 0

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += ["suffix"] if self.suffix else []
        bad += ["top_logprobs (a chat field; completions take logprobs=N)"] if self.top_logprobs is not None else []
        return bad + (["best_of"] if self.best_of not in (None, self.n) else [])

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def echoes(self) -> bool:
        return self.echo

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise BadRequestError("prompt must not be empty")
        return list(p)


class TextPart(BaseModel):
    """One part of a multi-part message; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn of a conversation, with one of OpenAI's roles. `content` is text or a list of text parts; only
    an assistant's turn may leave it null (OpenAI allows that beside tool calls)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs content (text or a list of text parts); only an "
                             "assistant's may be null")
        return self

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. The prompt is the model's chat template rendered over `messages`;
    without `max_tokens` (or `max_completion_tokens`) generation may run to the end of the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # how a required call is written (SamplingParams.tool_call_shape): set by the server from the chat template,
    # "hermes" where it asks for `<tool_call>` blocks
    _call_shape: str = PrivateAttr("punica")
    # "auto" replies held to valid calls once they begin one (set by the server where the tokenizer allows it)
    _constrain_auto: bool = PrivateAttr(False)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables (vLLM's): {"enable_thinking": false}
    logprobs: bool = False  # each generated token's logprob, and those of the `top_logprobs` most likely tokens
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # [{"type": "function", "function": {"name", "description", "parameters": JSON schema}}]: with tool_choice
    # "required" or naming one, the reply is one call of one of them (tool_use); "auto" (the default): the
    # model's own reply, calls read out of it (auto_tools); "none": a text reply
    tools: list[dict] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def unsupported(self) -> list[str]:  # tool_choice and parallel_tool_calls: tool_use checks them
        return [name for name in super().unsupported() if name not in ("tool_choice", "parallel_tool_calls")]

    def functions_offered(self) -> list[dict]:
        """The tools' `function` objects, checked (names, schemas as objects), in the request's order."""
        out = []
        for i, tool in enumerate(self.tools or ()):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise BadRequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}')
            name = fn.get("name")
            if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
                raise BadRequestError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-', "
                                      f"got {name!r}")
            if any(f["name"] == name for f in out):
                raise BadRequestError(f"tools[{i}]: two tools are named {name!r}")
            if not isinstance(fn.get("parameters", {}), dict):
                raise BadRequestError(f"tools[{i}].function.parameters must be a JSON schema object")
            out.append(fn)
        return out

    def tool_schemas(self) -> dict[str, dict]:
        """{name: JSON schema of its arguments} of every tool offered."""
        return {fn["name"]: fn.get("parameters") or NO_PARAMETERS for fn in self.functions_offered()}

    def tool_use(self) -> dict[str, dict] | None:
        """The tools the reply must call one of, {name: JSON schema of its arguments}, from `tools` and
        `tool_choice`; None: a free reply (no tools, tool_choice "none", or "auto": see auto_tools)."""
        schemas, choice = self.tool_schemas(), self.tool_choice
        if choice == "none" or (choice is None and not schemas):
            return None
        if not schemas:
            raise BadRequestError("tool_choice needs tools: list the functions the reply may call")
        if choice is None or choice == "auto":
            return None  # a free reply, which may make calls (auto_tools)
        if choice == "required":
            return schemas
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequestError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", '
                                  f'"function": {{"name": ...}}}}, got {choice!r}')
        if name not in schemas:
            raise BadRequestError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(schemas)})")
        return {name: schemas[name]}

    @property
    def auto_tools(self) -> bool:
        """tool_choice "auto" (the default when tools are given): the reply is the model's own, and calls are read
        out of it (tool_prompt.parse_calls)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def json_mode(self) -> dict:
        """JSON-schema mode for a call of one tool (the output is its arguments), a tool call among several
        (SamplingParams.tool_call: a name, then its arguments; in the template's own shape, for one tool too), else
        response_format's."""
        tools = self.tool_use()
        if tools is None:
            free = super().json_mode()
            if free or not self.auto_tools or not self._constrain_auto:
                return free
            # "auto": a reply that begins a call must be a whole, valid one (json_schema.AutoCallGrammar)
            return {"tool_call": self.tool_schemas(), "tool_call_shape": self._call_shape, "tool_call_auto": True}
        if (self.response_format or {}).get("type", "text") != "text" or self.guided():
            raise BadRequestError("response_format (or guided_regex / guided_choice) and a required tool call exclude "
                                  "each other: the reply is the call's arguments")
        if self._call_shape != "punica":  # the template's own shape: a name and the arguments, even for one tool
            return {"tool_call": tools, "tool_call_shape": self._call_shape}
        return {"json_schema": next(iter(tools.values()))} if len(tools) == 1 else {"tool_call": tools}

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoRARequest(BaseModel):
    """POST /v1/load_lora_adapter: register the PEFT directory `lora_path` (inside an allowed directory)
    under the model name `lora_name`."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)

    @field_validator("lora_name")
    @classmethod
    def _printable_name(cls, name: str) -> str:
        if not name.isprintable() or name != name.strip():
            raise ValueError("must be printable, without control characters or surrounding spaces")
        return name

    @field_validator("lora_path")
    @classmethod
    def _path_without_nul(cls, path: str) -> str:
        if "\0" in path:
            raise ValueError("must not contain a NUL character")
        return path


class UnloadLoRARequest(BaseModel):
    """POST /v1/unload_lora_adapter: new requests for `lora_name` get 404; in-flight ones finish."""

    lora_name: str = Field(min_length=1)


class TokenizeRequest(BaseModel):
    """POST /tokenize: the token ids of `prompt`, or of the chat template rendered over `messages`, as the
    completion routes would see them. `model`, if given, must be served (adapters share the base tokenizer)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt only: the tokenizer's BOS and the like
    add_generation_prompt: bool = True  # messages only: end with the assistant's turn opening
    chat_template_kwargs: dict[str, Any] | None = None  # messages only: more template variables

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) and messages (a conversation)")
        check_unicode(self.prompt if self.messages is None else self.messages, "prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """POST /detokenize: the text of token ids (special tokens skipped, as in completions)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    """`cached_tokens`: prompt tokens whose KV came from the prefix cache (per prompt, the fewest of its
    choices: a prompt that its first choice computed counts as computed, although its other choices read it)."""

    cached_tokens: int


class Usage(BaseModel):
    """Token counts of one response (prompt tokens counted once per prompt, not per choice)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models: the base model (parent None) or an adapter (parent = base)."""

    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "punica"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """GET /v1/models."""

    object: str = "list"
    data: list[ModelCard]
