"""The model directory's tokenizer (tokenizer.json, or a SentencePiece tokenizer.model), its chat template, and
incremental detokenization."""

from __future__ import annotations

import functools
import json
import os

from punica.errors import BadRequestError, ModelLoadError

SENTENCEPIECE_FILE = "tokenizer.model"
# texts a tokenizer.model read as BPE must encode to SentencePiece's own ids (sentencepiece_tokenizer)
_SELF_CHECK = ["Hello, world! It's 2024.", "  two spaces\tand a tab\nnew line", "accents é ü, 日本語 🤖"]


def sentencepiece_metadata(sp, add_bos: bool, add_eos: bool) -> dict:
    """A SentencePiece model's vocabulary as llama.cpp's GGUF metadata holds it (tokenizer.ggml.model "llama"):
    pieces, scores, token types (1 normal, 2 unknown, 3 control, 5 unused, 6 byte), special ids, BOS/EOS policy."""
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 1 for i in range(n)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": kinds,
            "tokenizer.ggml.add_space_prefix": sp.encode("a", out_type=str)[0].startswith("\u2581"),
            "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": add_eos}
    for key, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id())):
        if i >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    return meta


def sentencepiece_tokenizer(path: str, cfg: dict):
    """A `tokenizers.Tokenizer` for a SentencePiece BPE tokenizer.model (Llama 2's, Mistral's), built as the GGUF
    converter builds one from the same vocabulary (gguf_convert.build_tokenizer: merges from the scores, byte
    fallback), BOS/EOS as tokenizer_config.json says (BOS by default, as Llama's tokenizers add it). ModelLoadError
    without the sentencepiece package, or for a model it does not encode alike (a Unigram one)."""
    try:
        import sentencepiece
    except ImportError:
        raise ModelLoadError(f"{path} is a SentencePiece tokenizer (the directory has no tokenizer.json): "
                             "pip install sentencepiece to read it") from None
    from punica.model.gguf_convert import build_tokenizer

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    tok = build_tokenizer(sentencepiece_metadata(sp, bool(cfg.get("add_bos_token", True)),
                                                 bool(cfg.get("add_eos_token", False))))
    for text in _SELF_CHECK:
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            raise ModelLoadError(f"{path} is a SentencePiece model that Punica's BPE reading does not encode as "
                                 "SentencePiece does (a Unigram model?); add a tokenizer.json")
    return tok


class Tokenizer:
    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer as HFTokenizer

        tok_path, cfg_path = os.path.join(model_dir, "tokenizer.json"), os.path.join(model_dir, "tokenizer_config.json")
        cfg = {}
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot read {cfg_path}: {e}") from e
        sp_path = os.path.join(model_dir, SENTENCEPIECE_FILE)
        if not os.path.isfile(tok_path) and os.path.isfile(sp_path):
            self._tok = sentencepiece_tokenizer(sp_path, cfg)
        else:
            try:
                self._tok = HFTokenizer.from_file(tok_path)
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                raise ModelLoadError(f"cannot read {tok_path}: {e}") from e
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))

    @staticmethod
    def from_dir(model_dir: str) -> Tokenizer | None:
        """The directory's tokenizer.json, or else its SentencePiece tokenizer.model (older Llama 2 and Mistral
        checkpoints ship only that); None without either."""
        files = ("tokenizer.json", SENTENCEPIECE_FILE)
        return Tokenizer(model_dir) if any(os.path.isfile(os.path.join(model_dir, f)) for f in files) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a server can tokenize a long prompt on a worker
        # thread while its event loop keeps serving
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token decodes to (its vocabulary string's length: one
        character per byte in byte-level vocabularies, and a UTF-8 character has at least one byte), so a
        text of more than n * max_token_chars characters cannot fit in n tokens."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (what logprobs show for it)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def decode_delta(self, ids: list[int], prefix: int, read: int, end: int | None = None,
                     skip_special_tokens: bool = True, final: bool = False) -> tuple[str, int, int]:
        """Text that ids[read:end] add after ids[:read], decoding only the window from `prefix` (constant work
        per token; `end` defaults to len(ids)). Returns (delta, new prefix, new read); the delta is held back
        while it ends inside a UTF-8 character, or in a run of SentencePiece byte tokens, whose text is decided
        only as a whole (one that never forms UTF-8 decodes to a U+FFFD per byte, a valid byte among them
        included). `final`: the last call, nothing held back, so the deltas add up to the full decode. Start with
        prefix = read = the index of the first id to decode."""
        end = len(ids) if end is None else end
        if not final and end > read and ids[end - 1] in self._byte_fallback_ids:
            return "", prefix, read
        before = self.decode(ids[prefix:read], skip_special_tokens)
        after = self.decode(ids[prefix:end], skip_special_tokens)
        if final or (len(after) > len(before) and not after.endswith("\ufffd")):
            return after[len(before):], read, end
        return "", prefix, read

    @functools.cached_property
    def _decoder(self) -> dict:
        """The tokenizer's decoder, as tokenizer.json writes it."""
        return json.loads(self._tok.to_str()).get("decoder") or {}

    @functools.cached_property
    def _byte_fallback_ids(self) -> frozenset[int]:
        """The <0xNN> tokens of a vocabulary whose decoder joins runs of them into UTF-8 (ByteFallback)."""
        if "ByteFallback" not in {d.get("type") for d in self._decoder.get("decoders", [self._decoder])}:
            return frozenset()
        return frozenset(i for piece, i in self._tok.get_vocab(with_added_tokens=False).items()
                         if _byte_piece(piece) is not None)

    @functools.cached_property
    def token_bytes(self) -> list[bytes | None]:
        """Each token id's bytes in the decoded output (None for added and special tokens), for byte-level
        vocabularies (GPT-2's byte-to-character map) and SentencePiece-style ones ("\u2581" for a space,
        "<0xNN>" byte-fallback tokens). BadRequestError for others: JSON mode needs them."""
        decoder = json.dumps(self._decoder)
        vocab = self._tok.get_vocab(with_added_tokens=False)
        out: list[bytes | None] = [None] * self._tok.get_vocab_size(with_added_tokens=True)
        if '"ByteLevel"' in decoder:
            table = _byte_level_table()
            for text, i in vocab.items():
                try:
                    out[i] = bytes(table[c] for c in text)
                except KeyError:  # not a byte-level string: never drawn in JSON mode
                    pass
        elif "\\u2581" in decoder or "Metaspace" in decoder or "ByteFallback" in decoder:
            for text, i in vocab.items():
                byte = _byte_piece(text)
                out[i] = text.replace("\u2581", " ").encode("utf-8") if byte is None else bytes([byte])
        else:
            raise BadRequestError("constrained output (JSON, schema, tool-call, regex) needs a byte-level (GPT-2 "
                                  "style) or SentencePiece-style tokenizer; this model's tokenizer decodes with "
                                  f"{self._decoder.get('type')}")
        for token in self._tok.get_added_tokens_decoder().values() if hasattr(
                self._tok, "get_added_tokens_decoder") else ():
            i = self._tok.token_to_id(token.content)
            if i is not None:
                out[i] = None
        return out

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @functools.cached_property
    def _compiled_chat_template(self):
        """The chat template compiled once, in a sandbox (templates cannot reach Python objects' internals)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        """The chat template over `messages`, as token ids (the template holds the special tokens itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs),
                           add_special_tokens=False)

    @property
    def end_of_turn(self) -> tuple[int, ...]:
        """Stop ids for chat replies: the template's end-of-turn token (tokenizer_config's eos_token, which may
        differ from config.json's eos)."""
        eos = self.token_id(self.eos_token)
        return () if eos is None else (eos,)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, template_kwargs: dict | None = None) -> str:
        """`tools`: [{"type": "function", "function": {...}}] for templates that render them. `template_kwargs`:
        more variables for the template, such as Qwen3's `enable_thinking` (vLLM's `chat_template_kwargs`); they
        may not replace the ones set here."""
        if not self.chat_template:
            raise BadRequestError("this model has no chat template: send plain prompts (/v1/completions, or "
                                  "punica generate without --chat)")
        given = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                     eos_token=self.eos_token or "", **({"tools": tools} if tools else {}))
        extra = template_kwargs or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) and k.isidentifier() for k in extra):
            raise BadRequestError(f"chat_template_kwargs must map variable names to values, got {extra!r}")
        taken = sorted(set(extra) & {*given, "tools", "raise_exception"})
        if taken:
            raise BadRequestError(f"chat_template_kwargs may not set {', '.join(taken)}: the server sets "
                                  f"{'them' if len(taken) > 1 else 'it'} from the request")
        return self._compiled_chat_template.render(**extra, **given)


def _byte_piece(piece: str) -> int | None:
    """The byte a SentencePiece byte-fallback piece ("<0xNN>") stands for; None for other pieces."""
    return int(piece[3:5], 16) if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") else None


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others
    (control bytes, space, 127-160, 173) for the characters from U+0100 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + n): b for n, b in enumerate(others)}}


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise(message: str):
    raise BadRequestError(f"chat template: {message}")
