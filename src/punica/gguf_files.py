"""What reading llama.cpp GGUF files takes, model or adapter: their metadata, tensors under HF names and in HF's
row order, and the cache that holds each file's conversion (a directory converted once, reused while the file is
unchanged). A leaf: model/gguf_convert.py converts models with it, lora/gguf_lora.py adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Callable

import numpy as np

from punica.errors import ModelLoadError, PunicaError

Log = Callable[[str], None]

LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# general.architecture -> (HF architecture, HF model_type, q/k rows in llama.cpp's rope layout)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    "phi3": ("Phi3ForCausalLM", "phi3", False),
}
FUSED_FFN_UP = ("phi3",)  # architectures whose ffn_up holds gate and up stacked (HF's mlp.gate_up_proj)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def open_gguf(path: str, error: type[PunicaError] = ModelLoadError):
    """A gguf.GGUFReader of `path`; `error` naming the file where it cannot be read (bad magic, truncated)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError, IndexError) as e:  # how gguf reports a bad magic or a truncated file
        raise error(f"cannot read GGUF file {path!r}: {e}; is it complete?") from e


def is_adapter_file(path: str) -> bool:
    """Whether the GGUF file at `path` is a llama.cpp adapter (general.type "adapter"), not a model."""
    field = open_gguf(path).fields.get("general.type")
    return field is not None and field.contents() == "adapter"


def read_metadata(reader) -> dict:
    """Every GGUF metadata field as a Python value (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (and `.bias` likewise); a phi3 file's
    `ffn_up` is HF's `mlp.gate_up_proj`."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        module = "mlp.gate_up_proj" if m.group(2) == "ffn_up" and arch in FUSED_FFN_UP else LAYER_TENSORS[m.group(2)]
        return f"model.layers.{m.group(1)}.{module}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[m.group(1)]}.weight"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no LLaMA counterpart; is this a LLaMA-family file?")


def in_hf_row_order(name: str, w: np.ndarray, arch: str, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """The tensor `name` (`blk.N.<kind>.weight`, or a LoRA's B of it) with llama.cpp's rope permutation of q/k rows
    undone where `arch` has it (llama)."""
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    if not ARCHITECTURES[arch][2] or kind not in ("attn_q", "attn_k"):
        return w
    return unpermute_rope_rows(w, n_heads if kind == "attn_q" else n_kv_heads)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: per head, rows interleaved in pairs -> first halves, then second halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF's [out_features, in_features] orientation."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return np.asarray(dequantize(np.array(tensor.data), tensor.tensor_type), dtype=np.float32).reshape(shape)


# ---- the conversion cache --------------------------------------------------------------------------

STAMP = "punica_convert.json"  # in each conversion: what it was made from (file_stamp) and the files it holds


def cache_root() -> str:
    """`$PUNICA_CACHE`, else `~/.cache/punica` (read at call time, never at import)."""
    return os.environ.get("PUNICA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "punica")


def _is_current(target: str, stamp: dict) -> bool:
    if not os.path.isfile(os.path.join(target, STAMP)) or not all(
            os.path.isfile(os.path.join(target, f)) for f in stamp["files"]):
        return False
    with open(os.path.join(target, STAMP), encoding="utf-8") as f:
        return json.load(f) == stamp


def cached_conversion(gguf_path: str, target: str, stamp: dict, what: str, convert: Callable[..., str],
                      log: Log = stderr_log) -> str:
    """`target`, after `convert(gguf_path, out_dir, log=log)` wrote it, unless it already holds the conversion
    `stamp` describes (`stamp["files"]`: the files the conversion writes). The conversion goes into a temporary
    sibling that is then renamed into place, so no reader sees half a directory, and two processes converting at
    once both succeed. `what` names the cache in messages."""
    if _is_current(target, stamp):
        return target
    log(f"punica: first use of {what}; converting it into {target}")
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    except OSError as e:  # the cache path, or a folder above it, is a file, or is not writable
        raise ModelLoadError(f"cannot create the cache of {what} in {parent!r} ({e}); set PUNICA_CACHE to a "
                             "writable directory") from e
    os.chmod(tmp, 0o755)
    try:
        convert(gguf_path, tmp, log=log)
        with open(os.path.join(tmp, STAMP), "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        if os.path.isdir(target) and not _is_current(target, stamp):  # an older converter, or another file
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_current(target, stamp):  # a concurrent conversion finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_stamp(path: str, version: int, files: list[str]) -> dict:
    """What a cached conversion of the file at `path` (absolute) is made from, by converter `version`, and the
    `files` it writes: the conversion is redone when any of it changes."""
    info = os.stat(path)
    return {"source": path, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "converter_version": version,
            "files": list(files)}


def cache_dir(path: str, kind: str) -> str:
    """`<cache>/<kind>/<hash of the absolute path>/<file name without .gguf>`: the conversion of the file at `path`
    (absolute), named as the file."""
    name = os.path.basename(path)[:-len(".gguf")] if path.lower().endswith(".gguf") else os.path.basename(path)
    return os.path.join(cache_root(), kind, hashlib.sha256(path.encode()).hexdigest()[:12], name)
