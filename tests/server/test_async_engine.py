"""The engine thread in-process: a step that raises (a device fault, say) fails the requests it ran with
an error, and the engine keeps serving."""

from __future__ import annotations

import asyncio

import pytest
from test_parity import prompts

from punica import Engine, SamplingParams
from punica.server.async_engine import AsyncEngine, EngineFailure, EngineStats

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


async def collect(stream) -> list:
    return [delivery.output async for delivery in stream]


def test_a_failing_step_fails_its_requests_and_the_engine_lives(tiny_models):
    _, model_dir, adapters = tiny_models["llama"]
    engine = Engine.from_args(model_dir, adapters, device="cpu")
    launch, faults = engine.runner.launch, []

    def flaky(work, previous, *rest):
        if not faults:
            faults.append(len(work))
            raise RuntimeError("injected device fault")
        return launch(work, previous, *rest)

    engine.runner.launch = flaky
    ids = prompts(2, seed=4)

    async def scenario():
        runner = AsyncEngine(engine)
        runner.start()
        try:
            first = await collect(await runner.add([ids[0]], [GREEDY], "a4"))
            second = await collect(await runner.add([ids[1]], [GREEDY], None))
        finally:
            await runner.stop()
        return runner, first, second

    runner, first, second = asyncio.run(scenario())
    assert faults == [1]
    assert first[-1].finish_reason == "error" and "injected device fault" in first[-1].error
    assert second[-1].finished and second[-1].error is None and len(second[-1].token_ids) == 4
    assert runner.step_errors == 1
    assert engine.blocks.num_used == 0 and engine.adapters.slots.pins("a4") == 0


def test_a_dead_engine_thread_fails_its_streams_and_later_calls(tiny_models, monkeypatch):
    """A bug outside a step kills the engine thread: the open streams end with an error naming it, and
    later calls raise EngineFailure instead of waiting forever."""
    _, model_dir, adapters = tiny_models["llama"]
    engine = Engine.from_args(model_dir, adapters, device="cpu")
    ids = prompts(1, seed=5)

    def broken(*_args):
        raise RuntimeError("injected bug")

    async def scenario():
        runner = AsyncEngine(engine)
        runner.start()
        try:
            stream = await runner.add([ids[0]], [SamplingParams(max_tokens=64, ignore_eos=True)], None)
            monkeypatch.setattr(EngineStats, "of", broken)
            outputs = await asyncio.wait_for(collect(stream), 30)
            await asyncio.to_thread(runner._thread.join, 10)
            with pytest.raises(EngineFailure, match="engine thread died .*injected bug"):
                await asyncio.wait_for(runner.call(engine.list_loras), 10)
        finally:
            await runner.stop()
        return runner, outputs

    runner, outputs = asyncio.run(scenario())
    assert not runner.alive
    assert outputs[-1].finish_reason == "error" and "injected bug" in outputs[-1].error


def test_json_grammars_are_built_off_the_engine_thread(tiny_models, tmp_path, monkeypatch):
    """The vocabulary's byte tries (half a second for a real vocabulary) and each schema's grammar are built on
    a worker thread before the request is queued: the engine thread, which steps everyone's requests, finds
    them built."""
    import threading

    from test_json_mode import byte_tokenizer_model

    import punica.engine.engine as engine_module

    engine = Engine.from_args(*byte_tokenizer_model(tiny_models, tmp_path), device="cpu")
    built = []

    def recorded(cls):
        class Recorded(cls):
            def __init__(self, *args):
                built.append((cls.__name__, threading.current_thread().name))
                super().__init__(*args)
        return Recorded

    for name in ("Vocabulary", "JsonGrammar", "SchemaGrammar"):
        monkeypatch.setattr(engine_module, name, recorded(getattr(engine_module, name)))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}}
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, json_object=s == 0,
                             json_schema=schema if s else None) for s in range(3)]

    async def scenario():
        runner = AsyncEngine(engine)
        runner.start()
        try:
            return await collect(await runner.add(prompts(1, seed=6) * 3, params, "a4"))
        finally:
            await runner.stop()

    outputs = asyncio.run(scenario())
    assert sorted(kind for kind, _ in built) == ["JsonGrammar", "SchemaGrammar", "Vocabulary"]
    assert all(thread != "punica-engine" for _, thread in built), built
    finished = [out for out in outputs if out.finished]
    assert len(finished) == 3 and all(out.error is None for out in finished)
