"""`punica convert`: validate a PEFT LoRA adapter against a base model and write it ready for fast loading.

The output is a PEFT directory again (the original tensor names and adapter_config.json), with the weights
as contiguous tensors in `adapter_model.safetensors`, so PEFT and Punica both load it as it is. Every
problem raises AdapterError naming the cause, from the same validation that serving uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from argparse import Namespace
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from punica.config import ModelConfig, read_model_config
from punica.errors import AdapterError, ModelLoadError, PunicaError
from punica.lora.gguf_lora import gguf_adapter_dir, is_gguf_adapter
from punica.lora.peft import _KEY, _pattern_value, load_peft_adapter, load_tensors, read_adapter_config

MAX_SERVABLE_RANK = 256  # LoRAConfig.max_lora_rank's upper bound
DEFAULT_SERVING_RANK = 64  # LoRAConfig.max_lora_rank's default
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class ProjectionSummary:
    layers: list[int] = field(default_factory=list)
    ranks: set[int] = field(default_factory=set)
    alphas: set[float] = field(default_factory=set)
    scales: set[float] = field(default_factory=set)


@dataclass
class Conversion:
    """What `convert_adapter` read and wrote."""

    source: str
    source_file: str
    out_dir: str
    num_tensors: int
    nbytes: int
    dtypes: set[str]
    projections: dict[str, ProjectionSummary]
    config: dict
    base: ModelConfig

    @property
    def max_rank(self) -> int:
        return max(r for p in self.projections.values() for r in p.ranks)


def convert_adapter(adapter_dir: str, model_dir: str, out_dir: str | None = None) -> Conversion:
    """Validate `adapter_dir` against the model in `model_dir`; write `out_dir` (default: in place, where
    the new safetensors file then takes precedence over adapter_model.bin). A llama.cpp LoRA .gguf file is read
    through its cached PEFT conversion, and written by default into a directory beside it, named as it."""
    if is_gguf_adapter(adapter_dir):
        out_dir = out_dir or os.path.splitext(adapter_dir)[0]
        adapter_dir = gguf_adapter_dir(adapter_dir)
    out_dir = out_dir or adapter_dir
    model_cfg = read_model_config(model_dir)
    config = read_adapter_config(adapter_dir)
    load_peft_adapter("convert", adapter_dir, model_cfg, MAX_SERVABLE_RANK, dora=True)  # raises on any problem
    tensors = {key: t.detach().clone().contiguous() for key, t in load_tensors(adapter_dir).items()}
    projections: dict[str, ProjectionSummary] = {}
    for key, a in sorted(tensors.items()):  # the modules as the file has them (Phi-3's fused ones whole)
        m = _KEY.search(key)
        if not m or m.group(3) != "A":
            continue
        layer, proj, rank = int(m.group(1)), m.group(2), a.shape[0]
        summary = projections.setdefault(proj, ProjectionSummary())
        alpha = _pattern_value(config.get("alpha_pattern"), layer, proj, config.get("lora_alpha", 8))
        summary.layers.append(layer)
        summary.ranks.add(rank)
        summary.alphas.add(alpha)
        summary.scales.add(alpha / (rank ** 0.5 if config.get("use_rslora") else rank))
    _write(out_dir, tensors, config)
    source = WEIGHTS if os.path.isfile(os.path.join(adapter_dir, WEIGHTS)) else "adapter_model.bin"
    return Conversion(source=adapter_dir, source_file=source, out_dir=out_dir, num_tensors=len(tensors),
                      nbytes=sum(t.nbytes for t in tensors.values()),
                      dtypes={str(t.dtype).removeprefix("torch.") for t in tensors.values()},
                      projections=projections, config=config, base=model_cfg)


def _write(out_dir: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Each file written beside its final name, then renamed over it: no reader sees half a file. A failed
    write leaves neither temporary files nor a directory it created."""
    created = not os.path.exists(out_dir)
    tmp = {name: os.path.join(out_dir, name + ".tmp") for name in (WEIGHTS, CONFIG)}
    try:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, tmp[WEIGHTS], metadata={"format": "pt"})
        with open(tmp[CONFIG], "w") as f:
            json.dump(config, f, indent=2)
        # safetensors 0.8 creates files 0600 whatever the umask: give the weights the mode open() gave the config
        os.chmod(tmp[WEIGHTS], stat.S_IMODE(os.stat(tmp[CONFIG]).st_mode))
        for name, path in tmp.items():
            os.replace(path, os.path.join(out_dir, name))
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise AdapterError(f"cannot write the converted adapter to {out_dir!r}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            for path in tmp.values():
                if os.path.exists(path):
                    os.remove(path)
            if created and not os.listdir(out_dir):
                os.rmdir(out_dir)


def _fmt(values) -> str:
    return "/".join(f"{v:g}" for v in sorted(values))


def describe(c: Conversion, model_dir: str) -> str:
    """The report `punica convert` prints."""
    cfg = c.config
    lines = [f"adapter   {c.source} ({c.source_file})",
             f"base      {model_dir} ({c.base.architecture}: {c.base.num_layers} layers, hidden "
             f"{c.base.hidden_size}, {c.base.num_heads} heads, {c.base.num_kv_heads} kv heads)",
             f"lora      r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} use_rslora={bool(cfg.get('use_rslora'))}"
             + (f" rank_pattern={cfg['rank_pattern']}" if cfg.get("rank_pattern") else "")
             + (f" alpha_pattern={cfg['alpha_pattern']}" if cfg.get("alpha_pattern") else "")]
    for i, (proj, s) in enumerate(sorted(c.projections.items())):
        lines.append(f"{'modules' if i == 0 else '':9} {proj:<10} {len(s.layers):3} layers  rank {_fmt(s.ranks):<5} "
                     f"alpha {_fmt(s.alphas):<5} scale {_fmt(s.scales)}")
    dtypes = "/".join(sorted(c.dtypes))
    lines.append(f"wrote     {os.path.join(c.out_dir, WEIGHTS)} ({c.num_tensors} tensors, {dtypes}, "
                 f"{c.nbytes / 2**20:.2f} MiB) and {CONFIG}")
    if c.max_rank > DEFAULT_SERVING_RANK:
        lines.append(f"note      rank {c.max_rank} exceeds the default max_lora_rank={DEFAULT_SERVING_RANK}: "
                     f"serve with --max-lora-rank {c.max_rank}")
    return "\n".join(lines)


def main(args: Namespace) -> int:
    """`punica convert ADAPTER_DIR --model MODEL_DIR --out OUT_DIR`; returns the exit code."""
    try:
        if not getattr(args, "model", None):
            raise ModelLoadError("convert needs the base model the adapter was trained on: pass --model DIR")
        conversion = convert_adapter(args.adapter_dir, args.model, getattr(args, "out", None))
    except PunicaError as e:
        print(f"punica convert: error: {e}", file=sys.stderr)
        return 1
    print(describe(conversion, args.model))
    return 0
