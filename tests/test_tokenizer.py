"""Incremental detokenization: streamed deltas add up to the full decode, also across multi-byte characters; unreadable
tokenizer files raise ModelLoadError."""

from __future__ import annotations

import pytest
from factories import write_word_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from punica.engine.tokenizer import Tokenizer
from punica.errors import ModelLoadError

TEXT = "Déjà vu: naïve café — 東京 ünïcödé 🙂🚀 and plain ascii words, again and again."


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe")
    tok.save(str(path / "tokenizer.json"))
    return Tokenizer(str(path))


@pytest.mark.parametrize("text", [TEXT, "🙂🙂🙂", "a"])
def test_deltas_concatenate_to_the_full_decode(byte_bpe, text):
    ids = byte_bpe.encode(text)
    out, prefix, read = "", 0, 0
    for i in range(1, len(ids) + 1):
        delta, prefix, read = byte_bpe.decode_delta(ids[:i], prefix, read)
        assert "\ufffd" not in delta
        if byte_bpe.decode(ids[:i]).endswith("\ufffd"):
            assert delta == "", "a token that ends inside a character must be held back"
        out += delta
    assert out == byte_bpe.decode(ids) == text


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", '{"version": "1.0", "model": 5'),  # tokenizers raised a bare Exception
    ("tokenizer.json", '{"version": "1.0"}'),
    ("tokenizer_config.json", "{"),
])
def test_unreadable_tokenizer_files_raise(tmp_path, name, content):
    write_word_tokenizer(str(tmp_path))
    (tmp_path / name).write_text(content)
    with pytest.raises(ModelLoadError, match=f"cannot read .*{name}: "):
        Tokenizer(str(tmp_path))


def test_a_sentencepiece_tokenizer_model_serves_without_tokenizer_json(tmp_path, monkeypatch):
    """A model directory with only tokenizer.model (older Llama 2 and Mistral checkpoints) encodes as SentencePiece
    does, BOS first, and serves text prompts. Without the sentencepiece package, or for a Unigram model, the error
    says what to do."""
    import sys

    from factories import make_hf_model
    from test_gguf_convert import SPM_TEXTS, train_sentencepiece

    from punica import LLM, SamplingParams

    sp = train_sentencepiece()
    model_dir = tmp_path / "model"
    make_hf_model("llama", seed=4, vocab_size=sp.get_piece_size()).save_pretrained(model_dir)
    (model_dir / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    tok = Tokenizer.from_dir(str(model_dir))
    for text in SPM_TEXTS:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == text
    out = LLM(model=str(model_dir), dtype="float32", device="cpu").generate(
        [SPM_TEXTS[0]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=0))[0]
    assert len(out.token_ids) == 5 and [lp.token_id for lp in out.prompt_logprobs] == tok.encode(SPM_TEXTS[0])
    (model_dir / "tokenizer.model").write_bytes(train_sentencepiece("unigram").serialized_model_proto())
    with pytest.raises(ModelLoadError, match="does not encode as SentencePiece does"):
        Tokenizer(str(model_dir))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ModelLoadError, match="pip install sentencepiece"):
        Tokenizer(str(model_dir))


def test_deltas_of_sentencepiece_byte_runs_add_up_to_the_full_decode(tmp_path):
    """SentencePiece byte tokens decode as a run: one that never forms UTF-8 becomes a U+FFFD per byte, a valid
    byte among them included. So a run's text is held back until it ends (or the output does: `final`), and the
    streamed deltas add up to the full decode; a valid run streams its characters."""
    from factories import make_hf_model
    from test_gguf_convert import train_sentencepiece

    sp = train_sentencepiece()
    make_hf_model("llama", seed=4, vocab_size=sp.get_piece_size()).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    tok = Tokenizer.from_dir(str(tmp_path))
    byte = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in (0x46, 0xE2, 0x82, 0xAC, 0xF0)}
    word = sp.encode("return")
    cases = [[*word, byte[0x46], byte[0xE2], byte[0x82], *word],  # "F" then a cut-off euro sign: all U+FFFD
             [*word, byte[0xE2], byte[0x82], byte[0xAC], *word],  # a whole euro sign
             [*word, byte[0x46], byte[0xF0]]]  # the output ends inside a character
    for ids in cases:
        out, prefix, read = "", 0, 0
        for i in range(1, len(ids) + 1):
            delta, prefix, read = tok.decode_delta(ids, prefix, read, i, final=i == len(ids))
            if ids[i - 1] in byte.values() and i < len(ids):
                assert delta == "", "a byte run's text waits for its end"
            out += delta
        assert out == tok.decode(ids), ids
    assert "€" in tok.decode(cases[1]) and tok.decode(cases[0]).count("\ufffd") == 3
