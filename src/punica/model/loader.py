"""Load HF checkpoints (config.json + safetensors, single or sharded) into LlamaModel."""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from punica.config import read_model_config
from punica.errors import ModelLoadError
from punica.lora.peft import FUSED
from punica.model.llama import LlamaModel
from punica.ops import Ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"cannot read {index} ({type(e).__name__}: {e}): it must map 'weight_map' "
                                 "to {tensor name: shard file}") from e
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise ModelLoadError(f"{index} names shards missing from {model_dir!r}: {missing[:5]}")
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir!r}")


def _destinations(model: LlamaModel) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, ...]]]:
    """(HF tensor name -> the tensor, or slice of a fused one, of `model` it is copied into; name -> the names
    that stand for the same tensor another way). A fused projection comes as its parts (Llama's q_proj, k_proj,
    v_proj) or whole (Phi-3's qkv_proj): loading one form drops the other from what the checkpoint must hold."""
    dests: dict[str, torch.Tensor] = {}
    others: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        parts = FUSED.get(name.rsplit(".", 1)[-1])
        if not parts:
            continue
        prefix = name.rsplit(".", 1)[0]
        for kind in ("weight", "bias"):
            if getattr(module, kind) is None:
                continue
            whole, pieces = f"model.{name}.{kind}", [f"model.{prefix}.{part}.{kind}" for part in parts]
            dests[whole] = getattr(module, kind)
            for i, piece in enumerate(pieces):
                dests[piece] = getattr(module, kind)[module.slice_offsets[i]:module.slice_offsets[i + 1]]
                others[piece] = (whole,)
            others[whole] = tuple(pieces)
    for name, param in model.named_parameters():
        if name.rsplit(".", 2)[-2] not in FUSED:
            dests[name if name.startswith("lm_head") else f"model.{name}"] = param
    return dests, others


def load_weights(model: LlamaModel, model_dir: str) -> None:
    """Copy every tensor of the checkpoint into `model`; refuse unknown, missing or mis-shaped tensors."""
    dests, others = _destinations(model)
    for path in checkpoint_files(model_dir):
        try:
            _load_file(path, dests, others, model.config.tie_word_embeddings)
        except (OSError, SafetensorError) as e:  # a truncated or corrupt file, e.g. an interrupted download
            raise ModelLoadError(f"cannot read {path}: {e}; download or convert the checkpoint again") from e
    if dests:
        raise ModelLoadError(f"checkpoint in {model_dir!r} lacks tensors: {sorted(dests)[:5]}")
    _order_rotary_rows(model)


def _order_rotary_rows(model: LlamaModel) -> None:
    """With a partial rotary embedding, q's and k's rows in ModelConfig.rotary_row_order (adapters' lora_B and
    DoRA magnitudes get the same order as they load)."""
    cfg = model.config
    for layer in model.layers:
        proj = layer.self_attn.qkv_proj
        for i, part in enumerate(("q_proj", "k_proj")):
            order = cfg.rotary_row_order(part)
            if order is None:
                continue
            start, end = proj.slice_offsets[i], proj.slice_offsets[i + 1]
            for t in (proj.weight, proj.bias):
                if t is not None:
                    t[start:end] = t[start:end][order]


def _load_file(path: str, dests: dict[str, torch.Tensor], others: dict[str, tuple[str, ...]], tied: bool) -> None:
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            if "rotary_emb" in name or (name == "lm_head.weight" and tied):
                continue
            if name not in dests:
                raise ModelLoadError(f"unexpected tensor {name!r} in {path}")
            tensor, dst = f.get_tensor(name), dests.pop(name)
            for other in others.get(name, ()):  # the other form is no longer expected (nor accepted)
                dests.pop(other, None)
            if dst.shape != tensor.shape:
                raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dst.shape)}")
            dst.copy_(tensor)


def init_dummy_weights(model: LlamaModel, seed: int = 0) -> None:
    """Random weights (normal, std 0.02; norms 1) for benchmarks of an architecture without a checkpoint."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)


def load_model(model_dir: str, ops: Ops, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", quantization: str = "none") -> LlamaModel:
    """The model of `model_dir` on `device`; load_format "dummy" skips the checkpoint for random weights;
    quantization "fp8" stores the projections' weights in float8 (LoRALinear.quantize_fp8_) once loaded."""
    cfg = read_model_config(model_dir)
    with torch.device("meta"):  # allocate once, directly in the target dtype and device
        model = LlamaModel(cfg, ops)
    model = model.to(dtype).to_empty(device=device)
    model.after_materialize()
    with torch.no_grad():
        if load_format == "dummy":
            init_dummy_weights(model)
        else:
            load_weights(model, model_dir)
        if quantization == "fp8":
            quantize_fp8(model)
    return model.eval()


def quantize_fp8(model: LlamaModel) -> None:
    """Every projection of every decoder layer to float8 weights, a layer at a time; the 16-bit weights'
    memory goes back to the device (the KV cache is sized from what is free after)."""
    for i in range(len(model.layers)):
        for module in model.lora_modules(i).values():
            module.quantize_fp8_()
    if model.embed_tokens.weight.is_cuda:
        torch.cuda.empty_cache()
