"""Convert a llama.cpp GGUF (architectures llama, qwen2, qwen3 and phi3; byte-level BPE or SentencePiece vocabulary)
into an HF directory.

Writes `config.json`, `model.safetensors` (HF tensor names, dequantized), `tokenizer.json`,
`tokenizer_config.json` (with the chat template) and `generation_config.json`, so the result loads with
Punica's loader and with `transformers` alike. Two llama.cpp conventions are undone on the way: a llama file's
attn_q/attn_k rows are permuted back from llama.cpp's rope layout (qwen2, qwen3 and phi3 files keep HF's), and a
missing `output.weight` means tied embeddings. A phi3 file's fused attn_qkv and ffn_up (gate and up stacked) are
HF's qkv_proj and gate_up_proj.

`gguf_model_dir` is what serving a `.gguf` file takes: the conversion, once, into Punica's cache, reused while
the file is unchanged.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import torch
from safetensors import SafetensorError

from punica.errors import ModelLoadError
from punica.gguf_files import (
    ARCHITECTURES,
    STAMP,
    Log,
    cache_dir,
    dequantize_tensor,
    file_stamp,
    hf_tensor_name,
    in_hf_row_order,
    open_gguf,
    read_metadata,
    stderr_log,
)
from punica.gguf_files import cached_conversion as _cached_conversion

# what each architecture's HF config says beyond the common fields
_ARCH_CONFIG = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "qwen2": {"use_sliding_window": False, "sliding_window": None},
    "qwen3": {"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
    "phi3": {"attention_bias": False},
}
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell")  # llama.cpp splits every digit apart first
_PLAIN_GPT2 = ("gpt2", "default", "mpt", "olmo")
# Llama 3's split before the byte-level BPE: contractions, letters with one leading non-letter, digits in threes,
# punctuation runs, newlines, spaces (a space before a word stays with the word)
_CONTRACTIONS_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{DIGITS}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _CONTRACTIONS_SPLIT.replace("{DIGITS}", "{1,3}")
_QWEN2_SPLIT = _CONTRACTIONS_SPLIT.replace("{DIGITS}", "")  # the same, with every digit apart
_SPLITS = {**dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe"), _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}
# Llama 3.1's rope scaling as llama.cpp writes it (a rope_freqs tensor of per-frequency divisors): the parameters
# tried when reading it back, and how close each divisor must come
_LLAMA3_ROPE_CANDIDATES = [dict(low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=old)
                           for old in (8192, 4096, 2048, 16384, 32768) for low in (1.0, 2.0)
                           for high in (4.0, 2.0, 8.0)]
_ROPE_FREQS_RTOL = 1e-4
# tensors that are rope scaling, read into config.json: Llama 3.1's divisors, Phi-3's longrope factors
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type (1 normal, 5 unused, 6 byte)
_SPACE = "\u2581"  # SentencePiece's space


def _require(meta: dict, key: str):
    if key not in meta:
        raise ModelLoadError(f"GGUF metadata lacks {key!r}: not a llama.cpp LLaMA-family file")
    return meta[key]


def _f32(x: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05, the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(x)))


def architecture(meta: dict) -> str:
    """`general.architecture`, if this converter handles it (else ModelLoadError)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture is {arch!r}; this converter handles {sorted(ARCHITECTURES)}")
    return arch


def build_config(meta: dict, has_output: bool, dtype: torch.dtype) -> dict:
    """The HF `config.json` from llama.cpp's `<architecture>.*` hyperparameters."""
    arch = architecture(meta)
    hf_arch, model_type, _ = ARCHITECTURES[arch]
    hidden = int(_require(meta, f"{arch}.embedding_length"))
    heads = int(_require(meta, f"{arch}.attention.head_count"))
    # a phi3 file's rope dimension count is its rotary share (Phi-4-mini's 3/4 of each head), not the head size
    rope_dims = None if arch == "phi3" else meta.get(f"{arch}.rope.dimension_count")
    head_dim = meta.get(f"{arch}.attention.key_length", rope_dims or hidden // heads)
    return {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(meta, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": len(_require(meta, "tokenizer.ggml.tokens")),
        "hidden_act": "silu",
        **_ARCH_CONFIG[arch],
        **(_phi3_config(meta, int(head_dim)) if arch == "phi3" else {}),
        "tie_word_embeddings": not has_output,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _phi3_config(meta: dict, head_dim: int) -> dict:
    """Phi-3's fields beyond the common ones: its sliding window (Phi3ForCausalLM applies it by default) and the
    rotary share of each head, which the model loader refuses unless whole."""
    rope_dims = int(meta.get("phi3.rope.dimension_count", head_dim))
    return {"sliding_window": meta.get("phi3.attention.sliding_window"), "partial_rotary_factor": rope_dims / head_dim,
            "original_max_position_embeddings": int(meta.get("phi3.rope.scaling.original_context_length",
                                                             meta.get("phi3.context_length", 4096)))}


def convert_tensors(reader, arch: str, config: dict, dtype: torch.dtype, log: Log) -> dict[str, torch.Tensor]:
    """All weights, renamed to HF names, q/k un-permuted where llama.cpp permuted them, cast to `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(reader.tensors):
        if tensor.name in ROPE_TENSORS:  # in config.json's rope_scaling (convert_gguf)
            continue
        w = in_hf_row_order(tensor.name, dequantize_tensor(tensor), arch, config["num_attention_heads"],
                            config["num_key_value_heads"])
        out[hf_tensor_name(tensor.name, arch)] = torch.from_numpy(np.require(w, requirements=("C", "W"))).to(dtype)
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            log(f"  dequantized {i + 1}/{len(reader.tensors)} tensors")
    return out


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PLAIN_GPT2:
        return byte_level
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = sorted(_DIGITS_FIRST + _PLAIN_GPT2 + tuple(_SPLITS))
    raise ModelLoadError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {known}")


def rope_scaling(meta: dict, rope_freqs: np.ndarray | None, head_dim: int, theta: float,
                 factors: dict[str, np.ndarray] | None = None) -> dict | None:
    """HF's `rope_scaling` for the GGUF: linear or YaRN from `<architecture>.rope.scaling.*`; longrope from Phi-3's
    rope_factors_long / _short tensors (`factors`, by tensor name); Llama 3's from the `rope_freqs` divisors,
    whose parameters are found among the usual ones (or ModelLoadError)."""
    from punica.ops.norm_rope import rope_inv_freq

    arch = meta.get("general.architecture", "llama")
    key = f"{arch}.rope.scaling"
    if factors:
        if set(factors) != {"rope_factors_long.weight", "rope_factors_short.weight"}:
            raise ModelLoadError(f"GGUF has {sorted(factors)}: longrope needs rope_factors_long and _short")
        old = int(_require(meta, f"{key}.original_context_length"))
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": old,
                   "factor": int(meta.get(f"{arch}.context_length", old)) / old,
                   **{f"{kind}_factor": [_f32(v) for v in factors[f"rope_factors_{kind}.weight"].reshape(-1)]
                      for kind in ("long", "short")}}
        if meta.get(f"{key}.attn_factor") is not None:
            scaling["attention_factor"] = _f32(meta[f"{key}.attn_factor"])
        return scaling
    kind = meta.get(f"{key}.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(_require(meta, f"{key}.factor"))}
    if kind == "yarn":
        for name, default in (("yarn_log_multiplier", 0.0), ("yarn_attn_factor", 1.0), ("yarn_ext_factor", -1.0)):
            if meta.get(f"{key}.{name}", default) not in (default, None):  # DeepSeek's, and llama.cpp's own knobs
                raise ModelLoadError(f"GGUF {key}.{name}={meta[f'{key}.{name}']!r} is not supported (YaRN as "
                                     "Qwen's files set it: type, factor, original_context_length)")
        scaling = {"rope_type": "yarn", "factor": _f32(_require(meta, f"{key}.factor")),
                   "original_max_position_embeddings": int(_require(meta, f"{key}.original_context_length"))}
        for name in ("beta_fast", "beta_slow"):
            if meta.get(f"{key}.yarn_{name}") is not None:
                scaling[name] = _f32(meta[f"{key}.yarn_{name}"])
        return scaling
    if kind not in ("none", None):
        raise ModelLoadError(f"GGUF {key}.type={kind!r} is not supported (linear, yarn, or Llama 3's rope_freqs "
                             "tensor)")
    if rope_freqs is None:
        return None
    divisors = rope_freqs.astype(np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise ModelLoadError(f"GGUF rope_freqs has {divisors.size} entries; head_dim {head_dim} needs {head_dim // 2}")
    plain = rope_inv_freq(head_dim, theta, None).double().numpy()
    factor = _f32(float(divisors.max()))
    for params in _LLAMA3_ROPE_CANDIDATES:
        scaling = {"rope_type": "llama3", "factor": factor, **params}
        if np.allclose(plain / rope_inv_freq(head_dim, theta, scaling).double().numpy(), divisors,
                       rtol=_ROPE_FREQS_RTOL, atol=0):
            return scaling
    raise ModelLoadError("GGUF rope_freqs do not follow Llama 3's rope scaling with any usual parameters "
                         f"(factor {factor}, {len(_LLAMA3_ROPE_CANDIDATES)} others tried); not supported")


def _added_tokens(meta: dict) -> list:
    """Control tokens (and SentencePiece's unknown token) as special added tokens, user-defined ones as plain added
    tokens: llama.cpp matches both whole in the text."""
    from tokenizers import AddedToken

    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    special = (_CONTROL, _UNKNOWN) if meta.get("tokenizer.ggml.model") == "llama" else (_CONTROL,)
    return [
        AddedToken(tok, special=kind in special, normalized=False)
        for tok, kind in zip(tokens, types)
        if kind in special or kind == _USER_DEFINED
    ]


def add_bos_eos(meta: dict) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS and EOS; llama.cpp adds BOS to a SentencePiece vocabulary that says
    nothing."""
    default_bos = meta.get("tokenizer.ggml.model") == "llama"
    return (bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
            bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def _special_tokens_processor(meta: dict):
    """A TemplateProcessing that adds BOS / EOS as the file asks, or None."""
    from tokenizers import processors

    ends = []
    for wanted, key in zip(add_bos_eos(meta), ("bos_token_id", "eos_token_id")):
        token = _token(meta, key) if wanted else None
        if wanted and token is None:
            raise ModelLoadError(f"GGUF asks for tokenizer.ggml.add_{key[:3]}_token but has no tokenizer.ggml.{key}")
        ends.append(token)
    bos, eos = ends
    if bos is None and eos is None:
        return None
    single = [bos, "$A", eos]
    pair = single + [bos and f"{bos}:1", "$B:1", eos and f"{eos}:1"]
    return processors.TemplateProcessing(
        single=" ".join(filter(None, single)), pair=" ".join(filter(None, pair)),
        special_tokens=[(t, meta["tokenizer.ggml.tokens"].index(t)) for t in dict.fromkeys(filter(None, ends))])


def _byte_level_bpe(meta: dict):
    from tokenizers import Tokenizer, decoders, models, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    byte_level = processors.ByteLevel(trim_offsets=False)
    template = _special_tokens_processor(meta)
    tok.post_processor = byte_level if template is None else processors.Sequence([byte_level, template])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies: every split of a normal piece into two pieces of the
    vocabulary, the pieces of higher score merged first (SentencePiece merges the best-scoring pair at each step).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types or [1] * len(tokens))):
        if kind not in (1, _USER_DEFINED):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(meta: dict):
    """SentencePiece BPE as llama.cpp reads it (Llama 2, Mistral, TinyLlama): scores order the merges, characters
    outside the vocabulary fall back to <0xNN> byte tokens, a space is "▁" and the text gets a leading one;
    laid out as HF's own Llama 2 tokenizer.json is."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = _require(meta, "tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type") or []
    if len(scores) != len(tokens) or (types and len(types) != len(tokens)):
        raise ModelLoadError(f"GGUF tokenizer has {len(tokens)} tokens but {len(scores)} scores and {len(types)} "
                             "token types")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=sentencepiece_merges(tokens, scores, types),
                               unk_token=_token(meta, "unknown_token_id"), fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE)] * prefix + [normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    template = _special_tokens_processor(meta)
    if template is not None:
        tok.post_processor = template
    return tok


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary: byte-level BPE ('gpt2': merges listed) or SentencePiece
    BPE ('llama': merges implied by the scores), with the file's special tokens and BOS / EOS policy."""
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
    model = meta.get("tokenizer.ggml.model")
    if model not in builders:
        raise ModelLoadError(f"GGUF tokenizer.ggml.model={model!r} is not supported; supported: {sorted(builders)} "
                             "(byte-level BPE, SentencePiece BPE)")
    tok = builders[model](meta)
    tok.add_special_tokens(_added_tokens(meta))
    return tok


def _token(meta: dict, key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    return None if idx is None else meta["tokenizer.ggml.tokens"][idx]


def tokenizer_config(meta: dict, max_len: int) -> dict:
    """`tokenizer_config.json`: special tokens, BOS/EOS policy, chat template."""
    special = [t.content for t in _added_tokens(meta) if t.special]
    add_bos, add_eos = add_bos_eos(meta)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "additional_special_tokens": special,
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def generation_config(meta: dict) -> dict:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "pad_token_id": "padding_token_id"}
    return {hf: meta[f"tokenizer.ggml.{g}"] for hf, g in keys.items() if f"tokenizer.ggml.{g}" in meta}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert_gguf(
    gguf_path: str, out_dir: str, dtype: torch.dtype = torch.bfloat16, log: Log = stderr_log
) -> str:
    """Convert `gguf_path` into the HF directory `out_dir` (created if needed); returns `out_dir`."""
    if not os.path.isfile(gguf_path):
        raise ModelLoadError(f"GGUF file {gguf_path!r} does not exist")
    log(f"punica: converting {os.path.basename(gguf_path)} -> {out_dir}")
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = build_config(meta, has_output, dtype)
    rope = {t.name: dequantize_tensor(t) for t in reader.tensors if t.name in ROPE_TENSORS}
    config["rope_scaling"] = rope_scaling(meta, rope.pop("rope_freqs.weight", None), config["head_dim"],
                                          config["rope_theta"], rope)
    tokenizer = build_tokenizer(meta)
    tensors = convert_tensors(reader, meta["general.architecture"], config, dtype, log)
    try:
        _write_hf_dir(out_dir, tensors, config, tokenizer, meta)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise ModelLoadError(f"cannot write the converted model to {out_dir!r}: {e}") from e
    log(f"punica: wrote {len(tensors)} tensors ({dtype}) and tokenizer to {out_dir}")
    return out_dir


def _write_hf_dir(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, tokenizer, meta: dict) -> None:
    from safetensors.torch import save_file

    weights, config_path = os.path.join(out_dir, "model.safetensors"), os.path.join(out_dir, "config.json")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, weights, metadata={"format": "pt"})
    _write_json(config_path, config)
    # safetensors 0.8 creates files 0600 whatever the umask: give the weights the mode open() gave config.json
    os.chmod(weights, stat.S_IMODE(os.stat(config_path).st_mode))
    _write_json(os.path.join(out_dir, "generation_config.json"), generation_config(meta))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                tokenizer_config(meta, config["max_position_embeddings"]))
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer.to_str(pretty=True))  # as tokenizer.save writes it, but failing with OSError


# ---- the conversion cache --------------------------------------------------------------------------

CONVERTER_VERSION = 2  # raise it when the converter's output changes: cached conversions are then redone
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", STAMP]


def cached_conversion(gguf_path: str, target: str, stamp: dict, what: str, log: Log = stderr_log) -> str:
    """gguf_files.cached_conversion of a model: convert_gguf into `target`, unless it holds the conversion `stamp`
    (plus the model's files) describes."""
    return _cached_conversion(gguf_path, target, {**stamp, "files": MODEL_FILES}, what, convert_gguf, log)


def gguf_model_dir(gguf_path: str, log: Log = stderr_log) -> str:
    """The HF directory of a llama.cpp GGUF file, converted (bf16) on first use into
    `<cache>/gguf/<hash of its absolute path>/<file name without .gguf>`, so the model is served under its file's
    name. The conversion is redone when the file's size or modification time changes."""
    path = os.path.abspath(gguf_path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {gguf_path!r} does not exist")
    return cached_conversion(path, cache_dir(path, "gguf"), file_stamp(path, CONVERTER_VERSION, MODEL_FILES),
                             os.path.basename(path), log)


def model_dir(model: str) -> str:
    """The HF directory to load for `model`: itself, or for a `.gguf` file its cached conversion."""
    return gguf_model_dir(model) if str(model).lower().endswith(".gguf") else model
