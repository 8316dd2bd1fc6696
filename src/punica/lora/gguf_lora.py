"""llama.cpp LoRA adapters (`.gguf` files of general.type "adapter") as PEFT directories.

llama.cpp's `convert_lora_to_gguf.py` writes each adapted projection as two tensors, `<base tensor>.lora_a`
[r, in] and `.lora_b` [out, r], with one `adapter.lora.alpha` for all of them (scale alpha / r per tensor, 1 where
alpha is 0) and the base model's hyperparameters. It passes B through the base model's own conversion, so for
the llama architecture B's q and k rows are permuted into llama.cpp's rope layout like the base weights: they are
permuted back here. The result is a PEFT directory (adapter_config.json, adapter_model.safetensors in float32)
in Punica's cache, converted once and reused while the file is unchanged, which the PEFT loader then reads.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import numpy as np
import torch

from punica import gguf_files as gf
from punica.errors import AdapterError, ModelLoadError

FILES = ["adapter_config.json", "adapter_model.safetensors"]
CONVERTER_VERSION = 1  # raise it when the conversion's output changes: cached conversions are then redone
_LORA_TENSOR = re.compile(r"(.+\.weight)\.lora_([ab])")


def is_gguf_adapter(path: str) -> bool:
    """Whether `path` names a llama.cpp LoRA file (by its name: a .gguf file)."""
    return str(path).lower().endswith(".gguf") and os.path.isfile(path)


def gguf_adapter_dir(gguf_path: str, log: gf.Log = gf.stderr_log) -> str:
    """The PEFT directory of a llama.cpp LoRA file, converted on first use into `<cache>/gguf-lora/...`."""
    path = os.path.abspath(gguf_path)
    try:
        stamp = gf.file_stamp(path, CONVERTER_VERSION, FILES)
        return gf.cached_conversion(path, gf.cache_dir(path, "gguf-lora"), stamp, os.path.basename(path),
                                    convert_gguf_adapter, log)
    except ModelLoadError as e:  # the cache's own failures (not writable, ...): the adapter cannot be served
        raise AdapterError(str(e)) from e


def convert_gguf_adapter(gguf_path: str, out_dir: str, log: gf.Log = gf.stderr_log) -> str:
    """Write the PEFT form of the llama.cpp LoRA file `gguf_path` into `out_dir`; AdapterError names what is
    wrong with the file."""
    from safetensors.torch import save_file

    reader = gf.open_gguf(gguf_path, AdapterError)
    meta = gf.read_metadata(reader)
    kind = (meta.get("general.type"), meta.get("adapter.type"))
    if kind != ("adapter", "lora"):
        raise AdapterError(f"{gguf_path!r} is not a llama.cpp LoRA adapter (general.type={kind[0]!r}, adapter.type="
                           f"{kind[1]!r}); a model GGUF is served with --model")
    arch = meta.get("general.architecture")
    if arch not in gf.ARCHITECTURES:
        raise AdapterError(f"LoRA GGUF {gguf_path!r} is for architecture {arch!r}; served: {sorted(gf.ARCHITECTURES)}")
    q_heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", q_heads)
    if gf.ARCHITECTURES[arch][2] and q_heads is None:  # llama: B's q/k rows in llama.cpp's rope layout
        raise AdapterError(f"LoRA GGUF {gguf_path!r} lacks {arch}.attention.head_count: its q/k rows cannot be put "
                           "back in order")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        m = _LORA_TENSOR.fullmatch(tensor.name)
        if not m:
            raise AdapterError(f"LoRA GGUF {gguf_path!r}: tensor {tensor.name!r} is not a lora_a / lora_b pair member")
        pairs.setdefault(m.group(1), {})[m.group(2)] = gf.dequantize_tensor(tensor)
    tensors, ranks = {}, {}
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise AdapterError(f"LoRA GGUF {gguf_path!r}: {base} has lora_{''.join(ab)} without its other half")
        try:
            module = gf.hf_tensor_name(base, arch).removesuffix(".weight")
        except ModelLoadError:
            module = ""
        if not module.endswith("_proj"):  # the seven projections' names end so, norms' and embeddings' do not
            raise AdapterError(f"LoRA GGUF {gguf_path!r}: {base} is not one of the seven projections (embedding "
                               "and lm_head adapters are not supported)")
        a, b = ab["a"], gf.in_hf_row_order(base, ab["b"], arch, q_heads, kv_heads)
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"LoRA GGUF {gguf_path!r}: {base} has lora_a {a.shape} and lora_b {b.shape}, of "
                               "different ranks")
        ranks[module] = a.shape[0]
        for half, w in (("A", a), ("B", b)):
            tensors[f"base_model.model.{module}.lora_{half}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
    if not tensors:
        raise AdapterError(f"LoRA GGUF {gguf_path!r} holds no LoRA tensors")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, FILES[1]), metadata={"format": "pt"})
    with open(os.path.join(out_dir, FILES[0]), "w", encoding="utf-8") as f:
        json.dump(peft_config(ranks, float(meta.get("adapter.lora.alpha", 0.0)), meta.get("general.name")), f,
                  indent=2)
    log(f"punica: converted LoRA {os.path.basename(gguf_path)} ({len(ranks)} projections) -> {out_dir}")
    return out_dir


def peft_config(ranks: dict[str, int], alpha: float, base: str | None) -> dict:
    """PEFT's adapter_config.json giving each module (full name -> rank) llama.cpp's scale: alpha / rank, or 1
    where alpha is 0."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(m): n for m, n in ranks.items() if n != r}  # a key matches a module's full name as a suffix
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
        "lora_alpha": alpha or r, "rank_pattern": others, "alpha_pattern": {} if alpha else dict(others),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
    }
