"""Helpers shared by the test suite and the benchmarks' self-checks (kept in the package so there is
exactly one tolerance rule)."""

from __future__ import annotations

import os

import torch

# Relative-norm tolerance by the dtype of the tensor under test.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, tiny), computed in fp64."""
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 factor: float = 1.0) -> None:
    """Assert relative-norm closeness at the tolerance of `dtype` (default: actual's dtype) times factor."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = REL_TOL[dtype or actual.dtype] * factor
    err = rel_error(actual, expected)
    if not err <= tol:
        raise AssertionError(f"relative error {err:.3e} exceeds {tol:.1e} ({dtype or actual.dtype})")


def write_byte_tokenizer(model_dir: str, vocab_size: int = 128) -> None:
    """A byte-level (GPT-2 alphabet) BPE tokenizer.json of at most `vocab_size` ids: 0 unk, 1 bos, 2 eos
    (special), the printable ASCII bytes, newline and tab, then merges of JSON punctuation up to the size. For
    JSON-mode tests and benchmarks on random models (ids past it are never drawn in JSON mode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table = {b: byte_level.pre_tokenize_str(chr(b))[0][0] for b in range(0x80)}  # GPT-2's alphabet, ASCII part
    pieces = ["<unk>", "<s>", "</s>"] + [table[b] for b in (*range(0x20, 0x7F), 0x0A, 0x09)]
    merges = [(table[0x7B], table[0x22]), (table[0x22], table[0x3A]), (table[0x22], table[0x7D]),
              (table[0x2C], table[0x20]), (table[0x3A], table[0x20]), (table[0x20], table[0x22])]
    merges = merges[:max(0, vocab_size - len(pieces))]
    pieces += [a + b for a, b in merges]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(os.path.join(model_dir, "tokenizer.json"))
