"""Incremental detokenization: streamed deltas add up to the full decode, also across multi-byte characters."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from punica.engine.tokenizer import Tokenizer

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
