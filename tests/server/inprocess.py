"""The server in process, for the official openai client: Starlette's TestClient as its HTTP client, over a copy of
a tiny test model with a byte-level tokenizer (a byte a token) and a chat template."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import openai
from fastapi.testclient import TestClient

from punica import Engine
from punica.config import ServerConfig
from punica.server.app import build_app
from punica.testing import write_byte_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@contextlib.contextmanager
def openai_client(model_dir: str, adapters: dict[str, str], root: Path, chat_template: str = CHATML,
                  max_model_len: int | None = None, server: ServerConfig | None = None):
    """An openai.OpenAI client of a server over the model (served as "tiny") with these adapters; `max_model_len`
    raises the model's context too (offered tool schemas take room, a byte a token); `server`: its options."""
    path = shutil.copytree(model_dir, root / "model")
    write_byte_tokenizer(str(path))
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"chat_template": chat_template}, f)
    options = {}
    if max_model_len is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": max_model_len}))
        options = dict(max_model_len=max_model_len, num_blocks=512)
    engine = Engine.from_args(str(path), adapters, device="cpu", max_num_seqs=8, **{"num_blocks": 256, **options})
    try:
        with TestClient(build_app(engine, server or ServerConfig(), "tiny")) as http:
            yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    finally:
        engine.adapters.close()
