"""A streaming client that leaves before the response's first byte: Starlette then never starts the body
generator, whose `finally` is what stops the engine requests and closes the request's metrics. Driven over
raw ASGI (no socket can leave at that exact moment), for both of Starlette's ways of noticing a departure:
a failed send (ASGI spec 2.4, uvicorn's) and an http.disconnect message (older specs)."""

from __future__ import annotations

import asyncio
import json

import pytest
from live_server import BASE, prepare_files

from punica import Engine
from punica.config import ServerConfig
from punica.server.app import build_app


@pytest.fixture
def app(llama_with_tokenizer, tmp_path_factory):  # one per test: an app's lifespan runs once
    llama_dir, adapters = llama_with_tokenizer
    files = prepare_files(llama_dir, adapters, str(tmp_path_factory.mktemp("leave")))
    engine = Engine.from_args(files["model"], {"a4": adapters["a4"]}, device="cpu", max_num_seqs=4, num_blocks=128,
                              max_model_len=256)
    try:
        yield build_app(engine, ServerConfig(), BASE)
    finally:
        engine.adapters.close()


def scope_of(body: bytes, spec_version: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
            "root_path": "", "query_string": b"", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}


async def leave_before_first_byte(app, spec_version: str) -> None:
    body = json.dumps({"model": "a4", "prompt": "w1 w2 w3", "max_tokens": 200, "ignore_eos": True,
                       "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.05)  # the handler has returned its response by now
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            if spec_version >= "2.4":
                raise OSError("the client has gone")  # what uvicorn's send raises for a closed connection
            await asyncio.sleep(60)  # never delivered: the disconnect cancels it

    try:
        await app(scope_of(body, spec_version), receive, send)
    except Exception as exc:  # Starlette's ClientDisconnect, for the server to swallow
        assert "ClientDisconnect" in type(exc).__name__, exc


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_a_client_gone_before_the_first_byte_stops_its_request(app, spec_version):
    engine, metrics = app.state.engine, app.state.metrics

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            aborted = metrics.finished.labels("a4", "abort")._value.get()
            await asyncio.wait_for(leave_before_first_byte(app, spec_version), 10)
            for _ in range(200):  # the abort reaches the engine thread as a command
                if not engine.engine.num_running and not engine.engine.num_waiting:
                    break
                await asyncio.sleep(0.05)
            assert not engine.engine.num_running and not engine.engine.num_waiting, "the engine kept generating"
            assert metrics.finished.labels("a4", "abort")._value.get() == aborted + 1
            assert "a4" not in metrics._open  # the request's metrics were closed

    asyncio.run(scenario())
