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
