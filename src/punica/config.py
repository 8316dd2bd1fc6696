"""Frozen configuration dataclasses, validated on construction.

Values discovered at run time (number of KV blocks, dtype resolved from "auto") live in `RuntimeInfo`,
never here, so a config object always means what its author wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from punica.errors import ConfigError, ModelLoadError

BACKENDS = ("auto", "torch", "triton")
LORA_OVERLAPS = ("auto", "none", "delta", "shrink")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "dummy")  # the checkpoint, or random weights (benchmarks)
QUANTIZATIONS = ("none", "fp8")  # of the projections' weights (EngineConfig.quantization)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a LLaMA-family model, read from an HF `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    rotary_dim: int | None = None  # dimensions of each head that RoPE rotates, when not all (Phi-4-mini)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"
    torch_dtype: str = "float32"

    def __post_init__(self):
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rotary_row_order(self, proj: str) -> list[int] | None:
        """For a partial rotary embedding, the order (new -> checkpoint row) of q_proj's or k_proj's output rows
        that the model uses; None for other projections or a full one. Per head the rotated halves' dimensions
        (i, i + R/2) move to (i, i + D/2), the pair the rope kernels rotate, and the unrotated ones fill the rest,
        whose rope-table entries are the identity (cos 1, sin 0). q and k move alike, so q.k is unchanged."""
        d, r = self.head_dim, self.rotary_dim
        if r is None or r == d or proj not in ("q_proj", "k_proj"):
            return None
        rest = (d - r) // 2
        head = [*range(r // 2), *range(r, r + rest), *range(r // 2, r), *range(r + rest, d)]
        return [h * d + i for h in range(self.num_heads if proj == "q_proj" else self.num_kv_heads) for i in head]

    @property
    def long_rope_after(self) -> int | None:
        """Longrope (Phi-3.5, Phi-3 128k): the pretraining length, past which a sequence's rotations switch to the
        long-context factors (Sequence.rope_long); None for other scalings."""
        if rope_type(self.rope_scaling) != "longrope":
            return None
        return int(self.rope_scaling["original_max_position_embeddings"])


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM")
# architectures whose sliding_window applies without a use_sliding_window flag (Qwen2's and Qwen3's have one)
WINDOWED_BY_DEFAULT = ("MistralForCausalLM", "Phi3ForCausalLM")
# rope_scaling types ops/norm_rope.rope_inv_freq implements -> the fields each needs
ROPE_SCALING_FIELDS = {"default": (), "linear": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                       "yarn": ("factor", "original_max_position_embeddings"),
                       "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "factor")}


def rope_type(scaling) -> str | None:
    """A rope_scaling's type: "default" for none (or one naming none), None for what is not a dict. Older HF
    configs say "type"."""
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        return None
    return scaling.get("rope_type", scaling.get("type", "default"))


def read_model_config(model_dir: str) -> ModelConfig:
    """ModelConfig from `model_dir/config.json`, refusing architectures we do not implement."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(model_dir):
        raise ModelLoadError(f"model directory {model_dir!r} does not exist")
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model {model_dir!r} is not a directory: pass an HF model directory")
    if not os.path.isfile(path):
        raise ModelLoadError(f"no config.json in {model_dir!r}: pass an HF model directory")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, or not JSON (JSONDecodeError is a ValueError)
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    try:
        return _model_config(hf, path)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: missing or malformed field {e}") from e


def _model_config(hf: dict, path: str) -> ModelConfig:
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if not isinstance(archs, list):
        raise ModelLoadError(f"architectures in {path} must be a list, like [\"LlamaForCausalLM\"], got {archs!r}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"architecture {arch!r} in {path} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    kind = rope_type(scaling)
    if kind in ("yarn", "longrope"):
        # as transformers reads them: the pretraining length from the config's top level (Phi-3 keeps it there,
        # first), else the context; longrope's factor, when absent, the context over it
        old = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings",
                                                                         hf.get("max_position_embeddings"))
        scaling = {**scaling, "original_max_position_embeddings": old}
        if kind == "longrope" and scaling.get("factor") is None and is_int(old) and old > 0:
            scaling["factor"] = hf.get("max_position_embeddings", 4096) / old
    eos = hf.get("eos_token_id")
    heads, hidden = _size(hf, "num_attention_heads", path), _size(hf, "hidden_size", path)
    kv_heads = _size(hf, "num_key_value_heads", path, default=heads)
    if heads % kv_heads:
        raise ModelLoadError(f"num_key_value_heads={kv_heads} in {path} must divide num_attention_heads={heads}")
    if not hf.get("head_dim") and hidden % heads:
        raise ModelLoadError(f"hidden_size={hidden} in {path} is not a multiple of num_attention_heads={heads}; "
                             f"set head_dim")
    max_len = hf.get("max_position_embeddings", 4096)
    rope_scaling = _rope_scaling(scaling, path)
    head_dim = hf.get("head_dim") or hidden // heads
    partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)  # as transformers rounds it
    if partial != 1.0 and (arch != "Phi3ForCausalLM" or not 0 < rotary_dim <= head_dim or rotary_dim % 2):
        raise ModelLoadError(f"partial_rotary_factor={partial!r} in {path}: rotary embeddings over part of each head "
                             f"are supported for Phi3ForCausalLM, over an even number of its {head_dim} dimensions")
    half = rotary_dim // 2
    if kind == "longrope" and not all(isinstance(rope_scaling[f], list) and len(rope_scaling[f]) == half
                                      for f in ("short_factor", "long_factor")):
        raise ModelLoadError(f"rope_scaling in {path}: longrope's short_factor and long_factor need rotary dims / 2 "
                             f"= {half} entries each")
    if kind == "yarn":
        # the context YaRN extends to: the pretraining length times the factor (as vLLM derives it)
        max_len = max(max_len, int(rope_scaling["original_max_position_embeddings"] * rope_scaling["factor"]))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch in WINDOWED_BY_DEFAULT) else None
    if window is not None and not (isinstance(window, int) and window > 0):
        raise ModelLoadError(f"sliding_window={window!r} in {path} must be a positive integer or null")
    if window is not None and window < max_len:  # within the window, sliding attention is full attention
        max_len = window
    return ModelConfig(
        vocab_size=_size(hf, "vocab_size", path), hidden_size=hidden,
        intermediate_size=_size(hf, "intermediate_size", path), num_layers=_size(hf, "num_hidden_layers", path),
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_len,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM", rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        bos_token_id=hf.get("bos_token_id"), architecture=arch,
        torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
    )


def _rope_scaling(scaling, path: str) -> dict | None:
    """`scaling` if it is a rope scaling we implement with the fields it needs; else ModelLoadError."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"rope_scaling in {path} must be an object or null, got {scaling!r}")
    kind = rope_type(scaling)
    if kind is not None and kind not in ROPE_SCALING_FIELDS:
        raise ModelLoadError(f"rope_scaling type {kind!r} in {path} is not supported; supported: "
                             f"{', '.join(ROPE_SCALING_FIELDS)}")
    missing = [name for name in ROPE_SCALING_FIELDS.get(kind, ()) if name not in scaling]
    if missing:
        raise ModelLoadError(f"rope_scaling type {kind!r} in {path} lacks {', '.join(missing)}")
    return scaling


def _size(hf: dict, name: str, path: str, default: int | None = None) -> int:
    """hf[name], which must be a positive integer; `default` where it is absent or null, if given."""
    value = hf[name] if default is None or hf.get(name) is not None else default
    if not (is_int(value) and value > 0):
        raise ModelLoadError(f"{name}={value!r} in {path} must be a positive integer")
    return value


KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks=None` sizes the pool from `memory_fraction` of free device memory
    (CUDA) or `cpu_cache_bytes` (CPU)."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float = 0.85
    cpu_cache_bytes: int = 512 << 20
    # reuse the KV of full blocks that an earlier request computed with the same leading tokens and adapter
    # (a shared system prompt, a chat's earlier turns, a preempted request's own); unreferenced cached blocks
    # count as free
    enable_prefix_caching: bool = True
    # "auto": the model's dtype; "fp8" (or "fp8_e4m3"): float8 e4m3 without scales, half the bytes of a 16-bit
    # cache, so twice the tokens fit and a decode step reads half the KV; values beyond +-448 saturate
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two, got {self.block_size}")
        _check(self.num_blocks is None or self.num_blocks > 0, f"num_blocks must be positive, got {self.num_blocks}")
        _check(0.0 < self.memory_fraction <= 1.0, f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        _check(self.cpu_cache_bytes > 0, f"cpu_cache_bytes must be positive, got {self.cpu_cache_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: decodes first, then prefill chunks under `max_num_batched_tokens`. Prompt tokens
    whose logprobs a request asks for (prompt_logprobs, echo) are computed at most `max_prompt_logprob_tokens` a
    step: each needs a row of fp32 logits over the vocabulary, and the KV cache is sized after the largest step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int = 4096
    max_prompt_logprob_tokens: int = 512

    def __post_init__(self):
        _check(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= self.max_num_seqs,
               f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs}")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len must be positive")
        _check(self.max_waiting > 0, f"max_waiting must be positive (requests that may wait), got {self.max_waiting}")
        _check(self.max_prompt_logprob_tokens > 0,
               f"max_prompt_logprob_tokens must be positive, got {self.max_prompt_logprob_tokens}")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter residency: `max_loras` device slots (slot 0, "no adapter", comes on top), a CPU cache of
    `max_cpu_loras` adapters, ranks up to `max_lora_rank`. `enable_dora`: DoRA adapters are served too (every
    projection then scales its output per token by its adapter's magnitude over the adapted weight's row norms;
    off, they are refused and nothing is added to a step)."""

    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 64
    allowed_lora_dirs: tuple[str, ...] = ()
    enable_dora: bool = False

    def __post_init__(self):
        _check(self.max_loras > 0, f"max_loras must be positive, got {self.max_loras}")
        _check(0 < self.max_lora_rank <= 256, f"max_lora_rank must be in 1..256, got {self.max_lora_rank}")
        _check(self.max_cpu_loras >= self.max_loras,
               f"max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine needs besides the model's own config."""

    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    enforce_eager: bool = False
    # CUDA, steps of <= 512 tokens: what of a projection's LoRA runs on a second stream, concurrently with its
    # base GEMM. "delta": shrink and expand into a delta of its own, which the kernel after the projection adds
    # (llama.FUSIONS); "shrink": the shrink only, the expand then accumulates into the GEMM's output; "none":
    # both after the GEMM on one stream; "auto": "delta" for all four, the fastest decode graph on an H200
    # since the adds were folded (distinct, batch 32: 6.77 vs 6.90 ms with "shrink" for o and down;
    # benchmarks/results/textgen_NOTES.md).
    lora_overlap: str = "auto"
    lora_stream_priority: int = 0  # CUDA priority of that stream; < 0 schedules its kernels before the GEMM's
    max_graph_tokens: int | None = None  # steps with more tokens run eagerly (None: max_num_batched_tokens)
    load_format: str = "auto"
    # "fp8": the decoder layers' projection weights stored as float8 e4m3 with one scale per output row,
    # quantized as they load: half their memory. Not yet faster: on an H200 its GEMM runs at under half of copy
    # bandwidth (benchmarks/results/textgen_NOTES.md, session 22). Embeddings, the LM head, norms, adapters and
    # activations keep the model's dtype.
    quantization: str = "none"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _check(self.lora_overlap in LORA_OVERLAPS,
               f"lora_overlap must be one of {LORA_OVERLAPS}, got {self.lora_overlap!r}")
        _check(self.max_graph_tokens is None or self.max_graph_tokens > 0,
               f"max_graph_tokens must be positive, got {self.max_graph_tokens}")
        _check(self.load_format in LOAD_FORMATS,
               f"load_format must be 'auto' (checkpoint) or 'dummy' (random weights), got {self.load_format!r}")
        _check(self.quantization in QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")


@dataclass
class RuntimeInfo:
    """What the engine discovered at start-up (mutable, unlike the configs)."""

    device: str
    dtype: str
    backend: str
    num_blocks: int
    max_model_len: int
    step_reserve_bytes: int = 0  # device memory set aside for the largest eager step before sizing the KV cache
    kv_cache_dtype: str = ""  # the KV pool's dtype, resolved from CacheConfig.kv_cache_dtype
    quantization: str = "none"  # EngineConfig.quantization


_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoRAConfig}


def is_int(value) -> bool:
    """An int that is not a bool (True is an int to Python, never to a config or a request)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TYPE_CHECKS = {"int": is_int, "float": is_number,
                "str": lambda v: isinstance(v, (str, os.PathLike)), "bool": lambda v: isinstance(v, bool),
                "None": lambda v: v is None, "tuple": lambda v: isinstance(v, (tuple, list))}


def _check_type(key: str, value, annotation: str) -> None:
    """ConfigError unless `value` fits the field's annotation ("int | None", "tuple[str, ...]", ...); section
    fields (CacheConfig, ...) are not checked here."""
    kinds = [part.strip().split("[")[0] for part in str(annotation).split("|")]
    checks = [_TYPE_CHECKS[k] for k in kinds if k in _TYPE_CHECKS]
    if checks and not any(check(value) for check in checks):
        raise ConfigError(f"engine option {key} must be {annotation}, got {type(value).__name__} {value!r}")


def engine_config(**flat) -> EngineConfig:
    """Build an EngineConfig from flat keyword arguments: each name is a field of EngineConfig or of one
    of its sections (`max_loras=4`, `block_size=32`). Unknown names raise ConfigError."""
    top = {f.name for f in dataclasses.fields(EngineConfig)} - set(_SECTIONS)
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    owners = {f.name: sec for sec, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    kwargs = {}
    types = {f.name: f.type for cls in (EngineConfig, *_SECTIONS.values()) for f in dataclasses.fields(cls)}
    for key, value in flat.items():
        if key in types:
            _check_type(key, value, types[key])
        if key in top:
            kwargs[key] = value
        elif key in owners:
            sections[owners[key]][key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ConfigError(f"unknown engine option {key!r}; known: {sorted(top | set(owners))}")
    return EngineConfig(**kwargs, **{sec: _SECTIONS[sec](**vals) for sec, vals in sections.items()})


REASONING_PARSERS = ("qwen3", "deepseek_r1")


@dataclass(frozen=True)
class ServerConfig:
    """The OpenAI-compatible HTTP front end. `served_model_name=None` serves the base model under its
    directory's name; `retry_after` is the seconds a 503 (queue full) asks the client to wait.
    `load_loras_on_demand`: a request for a model nobody serves loads the adapter directory of that name from
    an allowed directory (LoRAConfig.allowed_lora_dirs), as /v1/load_lora_adapter would, then runs."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    retry_after: int = 1
    log_level: str = "info"
    max_request_bytes: int = 64 << 20  # larger request bodies get 413 before they are read whole
    load_loras_on_demand: bool = False
    # chat replies' <think>...</think> go to `reasoning_content` (vLLM's field): "qwen3" (a reply that opens with
    # <think>) or "deepseek_r1" (the template opens it: a reply is reasoning until </think>)
    reasoning_parser: str | None = None

    def __post_init__(self):
        _check(0 <= self.port < 65536, f"port must be in 0..65535, got {self.port}")
        _check(self.max_request_bytes > 0, f"max_request_bytes must be positive, got {self.max_request_bytes}")
        _check(self.served_model_name is None or bool(self.served_model_name.strip()),
               "served_model_name must not be empty (omit it to use the model directory's name)")
        _check(self.retry_after >= 0, f"retry_after must be >= 0, got {self.retry_after}")
        _check(self.api_key is None or bool(self.api_key), "api_key must not be empty (omit it to disable auth)")
        _check(self.reasoning_parser in (None, *REASONING_PARSERS),
               f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {self.reasoning_parser!r}")


def parse_lora_specs(specs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """["NAME=PATH" or "PATH", ...] -> {name: path}; a bare path is named after its directory."""
    adapters: dict[str, str] = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise ConfigError(f"--lora {spec!r}: expected NAME=PATH")
        if name in adapters:
            raise ConfigError(f"--lora: the name {name!r} is given twice")
        adapters[name] = path
    return adapters
