"""Read and validate PEFT LoRA directories against a base model.

Supported: `r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`, `target_modules` (any
subset of q/k/v/o/gate/up/down, a regex, or "all-linear"), `layers_to_transform`, `use_dora` (where the engine
enables it), weights in `adapter_model.safetensors` or `adapter_model.bin`. Everything else that changes the math
is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

from punica.config import ModelConfig, is_int, is_number
from punica.errors import AdapterError
from punica.lora.gguf_lora import gguf_adapter_dir, is_gguf_adapter

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the model's fused projections and their parts, in output order; a checkpoint may hold one whole (Phi-3's), and an
# adapter on one is served as one on each part, with lora_A shared and lora_B's rows split
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
CONFIG_FILE, WEIGHT_FILES = "adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")
MAX_SCALED_WEIGHT = 65504.0  # fp16's largest value: a scaled lora_B entry past it overflows activations downstream
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_MAGNITUDE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_magnitude_vector(?:\.[\w-]+)?"
                        r"(?:\.weight)?$")


@dataclass
class LoRAWeights:
    """One adapter on the CPU: module -> (A [r, in], B*scale [out, r]) keyed by (layer, projection)."""

    name: str
    path: str
    rank: int
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # DoRA: module -> the magnitude vector [out] (fp32) that rescales each output row of W + B*scale @ A
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def pinned(self) -> LoRAWeights:
        """The same weights in page-locked memory: copies to the GPU then run as DMA, without the host
        staging them (CUDA only)."""
        modules = {key: (a.pin_memory(), b.pin_memory()) for key, (a, b) in self.modules.items()}
        magnitudes = {key: m.pin_memory() for key, m in self.magnitudes.items()}
        return LoRAWeights(self.name, self.path, self.rank, modules, magnitudes)


def projection_shape(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of a base projection; k/v use the grouped-query width."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, cfg.q_size), "k_proj": (h, cfg.kv_size), "v_proj": (h, cfg.kv_size),
            "o_proj": (cfg.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, cfg.q_size + 2 * cfg.kv_size), "gate_up_proj": (h, 2 * i)}[proj]


def read_adapter_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(path):
        raise AdapterError(f"adapter directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise AdapterError(f"adapter {path!r} is not a directory: pass the PEFT adapter's folder (with "
                           "adapter_config.json) or a llama.cpp LoRA .gguf file")
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{path!r} has no adapter_config.json: not a PEFT adapter directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    check_values(cfg, path)
    return cfg


def _is_rank(value) -> bool:
    return is_int(value) and value > 0


def _is_alpha(value) -> bool:
    return is_number(value) and math.isfinite(value)


def _is_layers(value) -> bool:
    def is_layer(v) -> bool:
        return is_int(v) and v >= 0
    return value is None or is_layer(value) or isinstance(value, list) and all(map(is_layer, value))


def _is_targets(value) -> bool:
    return value is None or isinstance(value, str) or isinstance(value, list) and all(isinstance(t, str) for t in value)


_VALUE_CHECKS = {  # option: (accepts its value, what it must be); an option left out keeps its default
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_is_rank, "a positive integer"),
    "lora_alpha": (_is_alpha, "a finite number"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_is_rank, v.values())),
                     "an object mapping module patterns to positive integers"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_is_alpha, v.values())),
                      "an object mapping module patterns to finite numbers"),
    "target_modules": (_is_targets, "a module name or regex, a list of module names, or null"),
    "layers_to_transform": (_is_layers, "a layer index, a list of layer indices, or null"),
    # switches: a string such as "false" would read as on
    **{flag: (lambda v: v is None or isinstance(v, bool), "true or false")
       for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "use_qalora", "lora_bias")},
}


def check_values(cfg: dict, path: str) -> None:
    """Refuse option values of the wrong type and rank/alpha_pattern keys that are not regular expressions."""
    for option, (accepts, kind) in _VALUE_CHECKS.items():
        if option in cfg and not accepts(cfg[option]):
            value = cfg[option]
            raise AdapterError(f"adapter {path!r}: {option} must be {kind}, got {type(value).__name__} {value!r}")
    for option in ("rank_pattern", "alpha_pattern"):
        for key in cfg.get(option) or {}:
            try:
                re.compile(_suffix_pattern(key))
            except re.error as e:
                raise AdapterError(f"adapter {path!r}: {option} key {key!r} is not a valid regular expression "
                                   f"({e})") from e


def check_supported(cfg: dict, path: str, dora: bool = False) -> None:
    """Refuse PEFT options that change the computation in ways Punica does not implement (DoRA unless `dora`)."""
    def refuse(option: str, value, why: str) -> None:
        raise AdapterError(f"adapter {path!r}: {option}={value!r} is not supported ({why})")

    if cfg.get("peft_type", "LORA").upper() != "LORA":
        refuse("peft_type", cfg["peft_type"], "only LORA adapters are served")
    if cfg.get("use_dora") and not dora:
        refuse("use_dora", True, "DoRA adapters are served when the engine starts with enable_dora (--enable-dora)")
    if cfg.get("modules_to_save"):
        refuse("modules_to_save", cfg["modules_to_save"], "fully trained modules cannot be shared in a batch")
    if cfg.get("bias", "none") != "none":
        refuse("bias", cfg["bias"], "only bias='none' adapters are served")
    if cfg.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", True, "only nn.Linear targets exist in LLaMA models")
    for option, why in (("layer_replication", "it changes the base model's layers"),
                        ("lora_bias", "LoRA-B biases are not served"),
                        ("use_qalora", "QA-LoRA pools its inputs"),
                        ("megatron_config", "Megatron-parallel layers are not served")):
        if cfg.get(option):
            refuse(option, cfg[option], why)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        refuse("init_lora_weights", init, "this initialization changes the base weights; convert the adapter to "
               "plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, (list, tuple, set)):
        # entries may be module names or full paths ("all-linear" is saved expanded to paths)
        unknown = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in (*PROJECTIONS, *FUSED)})
        if unknown:
            refuse("target_modules", unknown, f"only {', '.join(PROJECTIONS + tuple(FUSED))} can carry adapters")


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    st, bin_ = (os.path.join(path, f) for f in WEIGHT_FILES)
    try:
        if os.path.isfile(st):
            with open(st, "rb") as f:  # load_file keeps ~24 KB of every call alive (safetensors issue 369): a
                return load_safetensors(f.read())  # server loading and unloading adapters grew without bound
        if os.path.isfile(bin_):
            return torch.load(bin_, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files surface from several libraries
        raise AdapterError(f"cannot read the weights of adapter {path!r}: {e}") from e
    raise AdapterError(f"{path!r} has neither adapter_model.safetensors nor adapter_model.bin")


def _suffix_pattern(key: str) -> str:
    """PEFT's regex for a rank/alpha_pattern key: the key matches a module's full name as a suffix."""
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: dict, layer: int, proj: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key that matches the module's full name as a suffix."""
    full = f"model.layers.{layer}.{'mlp' if proj in MLP else 'self_attn'}.{proj}"
    for key, value in (patterns or {}).items():
        if re.match(_suffix_pattern(key), full):
            return value
    return default


def load_peft_adapter(name: str, path: str, model_cfg: ModelConfig, max_rank: int,
                      dtype: torch.dtype = torch.float32, dora: bool = False) -> LoRAWeights:
    """Read, validate and scale one PEFT adapter (DoRA ones too with `dora`), or a llama.cpp LoRA .gguf file
    through its cached PEFT conversion. Raises AdapterError naming the problem."""
    source = path
    if is_gguf_adapter(path):
        path = gguf_adapter_dir(path)
    cfg = read_adapter_config(path)
    check_supported(cfg, path, dora)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in load_tensors(path).items():
        mag = _MAGNITUDE.search(key) if cfg.get("use_dora") else None
        if mag and mag.group(2) in (*PROJECTIONS, *FUSED):
            magnitudes[(int(mag.group(1)), mag.group(2))] = tensor
            continue
        m = _KEY.search(key)
        if not m or m.group(2) not in (*PROJECTIONS, *FUSED):
            raise AdapterError(f"adapter {path!r}: tensor {key!r} is not a LoRA weight of "
                               f"{'/'.join(PROJECTIONS + tuple(FUSED))} (embedding and lm_head adapters are not "
                               "supported)")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    if not pairs:
        raise AdapterError(f"adapter {path!r} holds no LoRA weights")
    _check_coverage(cfg, path, pairs)
    weights = LoRAWeights(name=name, path=source, rank=0)
    for (layer, proj), ab in sorted(pairs.items()):
        a, b = _scaled_pair(cfg, path, model_cfg, max_rank, layer, proj, ab, dtype)
        for part, rows in _parts(model_cfg, proj, b.shape[0]):
            if (layer, part) in weights.modules:
                raise AdapterError(f"adapter {path!r}, layer {layer}: has weights for {part} both alone and in "
                                   f"{proj}")
            weights.modules[(layer, part)] = (a, b[rows].contiguous())
        weights.rank = max(weights.rank, ab["A"].shape[0])
    if cfg.get("use_dora"):
        weights.magnitudes = {(layer, part): m[rows].contiguous()
                              for (layer, proj), m in _magnitudes(path, model_cfg, pairs, magnitudes).items()
                              for part, rows in _parts(model_cfg, proj, m.shape[0])}
    return weights


def _parts(model_cfg: ModelConfig, proj: str, rows: int) -> list[tuple[str, slice | torch.Tensor]]:
    """(projection, its rows of the module's output) for each projection a module of `rows` outputs covers:
    itself, or the parts of a fused one; q's and k's in the model's order (ModelConfig.rotary_row_order)."""
    spans, start = [], 0
    for part in FUSED.get(proj, (proj,)):
        width = projection_shape(model_cfg, part)[1] if proj in FUSED else rows
        order = model_cfg.rotary_row_order(part)
        spans.append((part, slice(start, start + width) if order is None else torch.tensor(order) + start))
        start += width
    return spans


def _magnitudes(path: str, model_cfg: ModelConfig, pairs: dict, magnitudes: dict) -> dict:
    """DoRA's magnitude vectors, one per adapted module, each [out_features], finite; as fp32."""
    if set(magnitudes) != set(pairs):
        missing = sorted(set(pairs) - set(magnitudes)) or sorted(set(magnitudes) - set(pairs))
        raise AdapterError(f"adapter {path!r}: use_dora needs a lora_magnitude_vector beside each lora_A/lora_B "
                           f"pair; (layer, projection) {missing[0]} has one without the other")
    out = {}
    for (layer, proj), m in sorted(magnitudes.items()):
        h_out = projection_shape(model_cfg, proj)[1]
        if tuple(m.shape) != (h_out,) or not m.is_floating_point() or not torch.isfinite(m).all():
            raise AdapterError(f"adapter {path!r}, layer {layer} {proj}: lora_magnitude_vector must be {h_out} "
                               f"finite numbers, got {m.dtype} {tuple(m.shape)}")
        out[(layer, proj)] = m.float().contiguous()
    return out


def _check_coverage(cfg: dict, path: str, pairs: dict[tuple[int, str], dict]) -> None:
    """Refuse weights that the config's target_modules (a list) or layers_to_transform leave out: PEFT would
    not apply them, so serving them would not reproduce the adapter."""
    targets = cfg.get("target_modules")
    names = {t.rsplit(".", 1)[-1] for t in targets} if isinstance(targets, (list, tuple)) else None
    layers = cfg.get("layers_to_transform")
    layers = {layers} if isinstance(layers, int) else set(layers) if isinstance(layers, (list, tuple)) else None
    for layer, proj in sorted(pairs):
        if names is not None and proj not in names:
            raise AdapterError(f"adapter {path!r}: has weights for {proj} (layer {layer}), which its "
                               f"target_modules {sorted(names)} leave out")
        if layers is not None and layer not in layers:
            raise AdapterError(f"adapter {path!r}: has weights for layer {layer}, which its layers_to_transform "
                               f"{sorted(layers)} leaves out")


def _scaled_pair(cfg: dict, path: str, model_cfg: ModelConfig, max_rank: int, layer: int, proj: str,
                 ab: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"adapter {path!r}, layer {layer} {proj}"
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{where}: has lora_{'/'.join(ab)} but needs both lora_A and lora_B")
    if layer >= model_cfg.num_layers:
        raise AdapterError(f"{where}: the base model has only {model_cfg.num_layers} layers")
    a, b = ab["A"], ab["B"]
    h_in, h_out = projection_shape(model_cfg, proj)
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != h_in or tuple(b.shape) != (h_out, r):
        raise AdapterError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                           f"projection ({h_in} -> {h_out}); expected [r, {h_in}] and [{h_out}, r]. "
                           "Was it trained on another base model?")
    if r > max_rank:
        raise AdapterError(f"{where}: rank {r} exceeds max_lora_rank={max_rank}; raise --max-lora-rank")
    configured = _pattern_value(cfg.get("rank_pattern"), layer, proj, cfg.get("r", r))
    if configured != r:
        raise AdapterError(f"{where}: the weights have rank {r} but the config says r={configured}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{where}: weights must be floating point, got {a.dtype} / {b.dtype}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{where}: the weights hold NaN or infinite values")
    alpha = _pattern_value(cfg.get("alpha_pattern"), layer, proj, cfg.get("lora_alpha", 8))
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    a, b = a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous()
    if not (torch.isfinite(a).all() and b.abs().max() <= MAX_SCALED_WEIGHT):  # max() of an empty B: r >= 1
        raise AdapterError(f"{where}: lora_B scaled by lora_alpha / r = {scale:g} reaches "
                           f"{b.float().abs().max().item():g} (or lora_A overflows {dtype}); no trained adapter "
                           f"comes near {MAX_SCALED_WEIGHT:g}, and its outputs would be infinite. Check lora_alpha")
    return a, b
