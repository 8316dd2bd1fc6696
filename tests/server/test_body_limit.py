"""max_request_bytes: a body over the limit gets the same 413 whether its Content-Length says so up front or
the bytes read pass the limit (a chunked body, which has no Content-Length)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from live_server import BASE

from punica import Engine
from punica.config import ServerConfig
from punica.server.app import build_app

LIMIT = 1000


@pytest.fixture(scope="module")
def app(tiny_models):
    _, model_dir, _ = tiny_models["llama"]
    return build_app(Engine.from_args(model_dir, device="cpu"), ServerConfig(max_request_bytes=LIMIT), BASE)


def post(app, content) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/completions", content=content,
                                     headers={"content-type": "application/json"})
    return asyncio.run(go())


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_413_request_too_large(app, chunked):
    body = json.dumps({"model": BASE, "prompt": "w5 " * LIMIT, "max_tokens": 1}).encode()

    async def chunks():
        for i in range(0, len(body), 256):
            yield body[i:i + 256]

    resp = post(app, chunks() if chunked else body)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"] == {"message": f"the request body exceeds {LIMIT} bytes (max_request_bytes)",
                                    "type": "invalid_request_error", "param": None, "code": "request_too_large"}
