"""Dynamic adapters under traffic, against a server in this process (so a test can hold an adapter's disk
read open): a load reads off the engine thread, unloading drops the adapter's metric series once its
requests are over, and the base model cannot be unloaded."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest
import uvicorn
from live_server import BASE, free_port, prepare_files
from prometheus_client.parser import text_string_to_metric_families

import punica.lora.manager
from punica import Engine
from punica.config import ServerConfig
from punica.server.app import build_app


class Gate:
    """While closed, holds every disk read of an adapter directory named gated-* until opened."""

    def __init__(self):
        self.reading = threading.Event()
        self.open = threading.Event()
        self.open.set()

    def close(self) -> None:
        self.reading.clear()
        self.open.clear()

    def wrap(self, load):
        def gated(name, path, *args, **kw):
            if os.path.basename(path).startswith("gated-"):
                self.reading.set()
                self.open.wait(30)
            return load(name, path, *args, **kw)
        return gated


class InProcessServer:
    def __init__(self, app):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def gate():
    return Gate()


@pytest.fixture(scope="module")
def server(llama_with_tokenizer, tmp_path_factory, gate):
    llama_dir, adapters = llama_with_tokenizer
    files = prepare_files(llama_dir, adapters, str(tmp_path_factory.mktemp("lifecycle")))
    shutil.copytree(adapters["a4"], os.path.join(files["allowed"], "gated-a4"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(punica.lora.manager, "load_peft_adapter", gate.wrap(punica.lora.manager.load_peft_adapter))
        engine = Engine.from_args(files["model"], {"a4": adapters["a4"], "b8": adapters["b8"]}, device="cpu",
                                  allowed_lora_dirs=[files["allowed"]], max_loras=2, max_cpu_loras=2,
                                  max_num_seqs=8, num_blocks=256, max_model_len=256)
        try:
            with InProcessServer(build_app(engine, ServerConfig(), BASE)) as srv:
                srv.allowed = files["allowed"]
                yield srv
        finally:
            gate.open.set()
            engine.adapters.close()


def post(server, route: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=timeout)


def load(server, name: str, directory: str) -> httpx.Response:
    return post(server, "load_lora_adapter", {"lora_name": name, "lora_path": os.path.join(server.allowed, directory)})


def unload(server, name: str) -> httpx.Response:
    return post(server, "unload_lora_adapter", {"lora_name": name})


def series_of(server, model: str) -> list[str]:
    text = httpx.get(f"{server.url}/metrics").text
    return [s.name for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.labels.get("model") == model]


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def wait_for(cond, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def error_of(resp: httpx.Response, status: int, *fragments: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert all(f in err["message"] for f in fragments), err["message"]
    return err


def test_a_slow_adapter_read_stalls_nobody(server, gate):
    """The load's disk read and checks run off the engine thread: requests for others are served meanwhile,
    and a second load of the same name, made during the read, is refused once the first one lands."""
    results: list[httpx.Response] = []
    loads = [threading.Thread(target=lambda: results.append(load(server, "slow", "gated-a4"))) for _ in range(2)]
    gate.close()
    for t in loads:
        t.start()
    try:
        assert gate.reading.wait(10)
        base = post(server, "completions", {"model": BASE, "prompt": "w5 w6", "max_tokens": 4, "ignore_eos": True},
                    timeout=10)
        assert base.status_code == 200 and base.json()["usage"]["completion_tokens"] == 4  # the read still waits
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert "slow" not in {m["id"] for m in models}
    finally:
        gate.open.set()
        for t in loads:
            t.join(30)
    assert sorted(r.status_code for r in results) == [200, 400]
    error_of(next(r for r in results if r.status_code == 400), 400, "already registered")
    same = [post(server, "completions", {"model": m, "prompt": "w7 w8", "max_tokens": 6, "temperature": 0})
            for m in ("slow", "a4")]
    assert same[0].json()["choices"][0]["text"] == same[1].json()["choices"][0]["text"]


def test_unloading_drops_the_adapters_metric_series_after_its_requests(server):
    assert load(server, "gone", "copy-c16").status_code == 200
    assert post(server, "completions", {"model": "a4", "prompt": "w5", "max_tokens": 2}).status_code == 200
    body = {"model": "gone", "prompt": "w5 w6", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
        events = (line for line in resp.iter_lines() if line.startswith("data: "))
        next(events)
        assert unload(server, "gone").status_code == 200
        assert "punica_requests_total" in series_of(server, "gone")  # still streaming
        rest = list(events)
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    wait_for(lambda: not series_of(server, "gone"), "the unloaded adapter's series to go")
    assert "punica_requests_total" in series_of(server, "a4")  # other adapters keep theirs
    assert load(server, "gone", "copy-a4").status_code == 200  # the name again: fresh series
    assert post(server, "completions", {"model": "gone", "prompt": "w5", "max_tokens": 2}).status_code == 200
    assert unload(server, "gone").status_code == 200
    assert series_of(server, "gone") == []  # nothing in flight: dropped at once


def test_the_base_model_cannot_be_unloaded(server):
    err = error_of(unload(server, BASE), 400, "base model", "cannot be unloaded")
    assert err["type"] == "invalid_request_error"
    error_of(unload(server, "never-loaded"), 404, "never-loaded")
    assert post(server, "completions", {"model": BASE, "prompt": "w5", "max_tokens": 2}).status_code == 200


def test_requests_queued_for_an_unloaded_adapter_finish_after_its_files_are_deleted(server, gate):
    """Unload answers once the weights that requests in flight need are in memory (here: read back from disk,
    as two newer adapters pushed them out of the 2-adapter CPU cache), so the directory may go right after."""
    doomed = os.path.join(server.allowed, "gated-doomed")
    shutil.copytree(os.path.join(server.allowed, "copy-c16"), doomed)
    assert load(server, "doomed", "gated-doomed").status_code == 200
    busy = {"model": BASE, "prompt": "w5", "max_tokens": 240, "n": 8, "stream": True, "ignore_eos": True}
    prompt = {"model": "doomed", "prompt": "w9 w10", "max_tokens": 6, "temperature": 0}
    queued: list[httpx.Response] = []
    waiters = [threading.Thread(target=lambda: queued.append(post(server, "completions", prompt))) for _ in range(2)]
    unloaded: list[httpx.Response] = []
    unloader = threading.Thread(target=lambda: unloaded.append(unload(server, "doomed")))
    with httpx.stream("POST", f"{server.url}/v1/completions", json=busy, timeout=30) as resp:  # all 8 seqs
        next(resp.iter_lines())
        for name in ("fill-1", "fill-2"):
            assert load(server, name, "copy-a4").status_code == 200
        gate.close()
        try:
            for t in waiters:
                t.start()
            assert gate.reading.wait(10)  # the queued requests' adapter, read back in the background
            wait_for(lambda: metric(server, "punica_num_requests_waiting") == 2, "both requests to queue")
            unloader.start()
            unloader.join(0.5)
            assert unloader.is_alive()  # answers only once the weights are in memory
        finally:
            gate.open.set()
        unloader.join(10)
        assert unloaded[0].status_code == 200
        shutil.rmtree(doomed)
        for name in ("fill-3", "fill-4"):
            assert load(server, name, "copy-a4").status_code == 200
        # leaving the stream aborts its 8 choices: the queued requests start
    for t in waiters:
        t.join(30)
    assert [r.status_code for r in queued] == [200, 200], [r.text for r in queued]
    assert load(server, "same-weights", "copy-c16").status_code == 200
    expected = post(server, "completions", {**prompt, "model": "same-weights"}).json()["choices"][0]["text"]
    assert [r.json()["choices"][0]["text"] for r in queued] == [expected, expected]
    for name in ("fill-1", "fill-2", "fill-3", "fill-4", "same-weights"):
        assert unload(server, name).status_code == 200


def test_adapters_load_on_demand_once_however_many_requests_wait(llama_with_tokenizer, tmp_path, gate):
    """With load_loras_on_demand, a request for a model nobody serves, named like an adapter directory in an
    allowed directory, loads it (one read, while every request for it waits) and runs on it. Other names stay
    404, a broken adapter is a 400 naming its fault, and no name reaches outside the allowed directories."""
    from concurrent.futures import ThreadPoolExecutor

    llama_dir, adapters = llama_with_tokenizer
    files = prepare_files(llama_dir, adapters, str(tmp_path))
    shutil.copytree(adapters["a4"], os.path.join(files["allowed"], "gated-a4"))
    reads = []
    load = punica.lora.manager.load_peft_adapter

    def counted(name, path, *args, **kw):
        reads.append(os.path.basename(path))
        return load(name, path, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(punica.lora.manager, "load_peft_adapter", gate.wrap(counted))
        engine = Engine.from_args(files["model"], {"a4": adapters["a4"]}, device="cpu",
                                  allowed_lora_dirs=[files["allowed"]], max_loras=2, max_cpu_loras=2,
                                  max_num_seqs=8, num_blocks=256, max_model_len=256)
        try:
            with InProcessServer(build_app(engine, ServerConfig(load_loras_on_demand=True), BASE)) as srv:
                body = {"model": "gated-a4", "prompt": "w5 w6 w7", "max_tokens": 6, "temperature": 0}
                gate.close()
                with ThreadPoolExecutor(3) as pool:
                    waiting = [pool.submit(post, srv, "completions", body) for _ in range(3)]
                    assert gate.reading.wait(30)
                    time.sleep(0.5)  # all three requests are in, waiting on the one read
                    gate.open.set()
                    answers = [f.result() for f in waiting]
                assert [r.status_code for r in answers] == [200] * 3
                same = post(srv, "completions", {**body, "model": "a4"}).json()["choices"][0]["text"]
                assert {r.json()["choices"][0]["text"] for r in answers} == {same}  # a copy of a4
                assert reads.count("gated-a4") == 1
                cards = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"]
                assert any(c["id"] == "gated-a4" and c["parent"] == BASE for c in cards)
                error_of(post(srv, "completions", {**body, "model": "nope"}), 404, "'nope' does not exist")
                error_of(post(srv, "completions", {**body, "model": "dora"}), 400, "use_dora")
                for outside in ("..", "../allowed/copy-a4", os.path.join(files["allowed"], "copy-a4")):
                    error_of(post(srv, "completions", {**body, "model": outside}), 404, "does not exist")
        finally:
            gate.open.set()
            engine.adapters.close()


def test_llama_cpp_lora_files_load_by_path_and_on_demand(llama_with_tokenizer, tiny_models, tmp_path, monkeypatch):
    """A llama.cpp LoRA file in an allowed directory serves as the PEFT adapter it came from: loaded through
    /v1/load_lora_adapter by its path, and on demand by its name without .gguf."""
    from test_gguf_lora import write_lora_gguf

    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path / "cache"))

    llama_dir, adapters = llama_with_tokenizer
    files = prepare_files(llama_dir, adapters, str(tmp_path))
    gguf = write_lora_gguf(os.path.join(files["allowed"], "b8-file.gguf"), tiny_models["llama"][0], adapters["b8"],
                           "llama")
    engine = Engine.from_args(files["model"], {"b8": adapters["b8"]}, device="cpu", max_loras=3, max_cpu_loras=3,
                              allowed_lora_dirs=[files["allowed"]], max_num_seqs=8, num_blocks=256, max_model_len=256)
    try:
        with InProcessServer(build_app(engine, ServerConfig(load_loras_on_demand=True), BASE)) as srv:
            body = {"prompt": "w5 w6 w7", "max_tokens": 6, "temperature": 0}
            same = post(srv, "completions", {**body, "model": "b8"}).json()["choices"][0]["text"]
            assert post(srv, "completions", {**body, "model": "b8-file"}).json()["choices"][0]["text"] == same
            loaded = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "b8-path", "lora_path": gguf},
                                timeout=30)
            assert loaded.status_code == 200, loaded.text
            assert post(srv, "completions", {**body, "model": "b8-path"}).json()["choices"][0]["text"] == same
            bad = httpx.post(f"{srv.url}/v1/load_lora_adapter", timeout=30,
                             json={"lora_name": "x", "lora_path": os.path.join(files["allowed"], "nope.txt")})
            error_of(bad, 400, "neither a PEFT adapter directory nor a llama.cpp LoRA .gguf file")
    finally:
        engine.adapters.close()
