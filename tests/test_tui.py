"""The multi-LoRA TUI, headless through Textual's pilot, on the tiny llama with a word tokenizer."""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time

import pytest

from punica import Engine, SamplingParams
from punica.tui.app import MultiLoRAApp, Pane, engine_options, main, resolve_models
from punica.tui.session import EngineLoop

ADAPTERS = ["a4", "b8", "d8"]  # d8 is a .bin adapter with rank/alpha patterns


@pytest.fixture(scope="module")
def engine(llama_with_tokenizer):
    model_dir, adapters = llama_with_tokenizer
    return Engine.from_args(model_dir, {n: adapters[n] for n in ADAPTERS}, device="cpu", dtype="float32",
                            backend="torch")


async def wait_for(pilot, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the TUI"
        await pilot.pause(0.05)


def run_app(app: MultiLoRAApp, scenario) -> None:
    async def go():
        async with app.run_test(size=(160, 40)) as pilot:
            await scenario(pilot)

    asyncio.run(go())


def test_every_pane_streams_and_status_shows_rate(engine):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    app = MultiLoRAApp(engine, [None, *ADAPTERS], prompt="w5 w6 w7", params=params)
    seen = {}

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.rounds_done == 1)  # the default prompt runs at start
        seen["first"] = [p.answer for p in app.query(Pane)]
        seen["subtitles"] = [str(p.border_subtitle) for p in app.query(Pane)]
        prompt = app.query_one("#prompt")
        prompt.value = ""
        await pilot.click("#prompt")
        await pilot.press(*"w9 w10 w11 w12", "enter")
        await wait_for(pilot, lambda: app.rounds_done == 2)
        seen["second"] = [p.answer for p in app.query(Pane)]
        seen["status"] = str(app.query_one("#status").render())

    run_app(app, scenario)
    assert app.prompt == "w9 w10 w11 w12"
    for answers in (seen["first"], seen["second"]):
        assert len(answers) == 1 + len(ADAPTERS)
        assert all(a.startswith("w") for a in answers), answers
        assert len(set(answers)) == len(answers), "each adapter (and the base) should answer differently"
    assert seen["first"] != seen["second"]
    assert seen["subtitles"] == ["12 tokens · length"] * len(answers)
    assert "tok/s" in seen["status"] and "peak batch size 4" in seen["status"], seen["status"]
    assert not engine.has_unfinished()


def answers_of(engine, models, params, prompt: str) -> list[str]:
    """What each model answers to `prompt`, from the engine loop run synchronously."""
    reports = []
    EngineLoop(engine, models, params, reports.append)._run_round(1, prompt)
    assert reports[-1].done and reports[-1].error is None
    return ["".join(r.deltas.get(i, "") for r in reports) for i in range(len(models))]


def test_a_new_prompt_replaces_the_round_in_flight(engine):
    models = [None, *ADAPTERS]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    app = MultiLoRAApp(engine, models, prompt="w5 w6 w7", params=params, autostart=False)

    async def scenario(pilot):
        app.submit("w20 w21")
        await wait_for(pilot, lambda: any(p.answer for p in app.query(Pane)))
        app.submit("w30 w31")
        await wait_for(pilot, lambda: app.rounds_done == 1)
        await pilot.pause(0.2)  # nothing from the replaced round may arrive later
        shown.extend(p.answer for p in app.query(Pane))

    shown = []
    run_app(app, scenario)
    assert app.rounds_done == 1 and not engine.has_unfinished()
    assert shown == answers_of(engine, models, params, "w30 w31")


def test_engine_loop_reports_errors_and_keeps_going(engine):
    reports = []
    loop = EngineLoop(engine, [None, "a4"], SamplingParams(max_tokens=2, temperature=0.0), reports.append)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        for prompt, expect_error in (("", True), ("w3", False)):
            round_id = loop.submit(prompt)
            deadline = time.monotonic() + 10
            while not (reports and reports[-1].round_id == round_id and reports[-1].done):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert (reports[-1].error is not None) == expect_error, reports[-1]
    finally:
        loop.stop()
        thread.join()
    assert "empty" in reports[0].error and not engine.has_unfinished()


def test_main_builds_the_engine_from_args(llama_with_tokenizer, monkeypatch, capsys):
    model_dir, adapters = llama_with_tokenizer
    started = []
    monkeypatch.setattr(MultiLoRAApp, "run", lambda app: started.append(app))
    args = argparse.Namespace(model=model_dir, lora=[f"x={adapters['a4']}", adapters["c16"]], prompt="w3 w4",
                              device="cpu", dtype="float32", backend="torch", max_tokens=5, max_num_seqs=8)
    assert main(args) == 0
    (app,) = started
    assert app.models == [None, "x", os.path.basename(adapters["c16"])] and app.prompt == "w3 w4"
    assert app.params.max_tokens == 5 and app.params.temperature == 0.7 and app.params.seed == 0  # defaults
    assert app.notice is None
    assert app.engine.config.scheduler.max_num_seqs == 8 and app.engine.info.device == "cpu"

    args.lora = [f"bad={model_dir}"]  # a model directory is no adapter
    assert main(args) == 1 and started == [app]
    assert "punica demo: error:" in capsys.readouterr().err


def test_main_refuses_a_model_without_tokenizer(tiny_models, monkeypatch, capsys):
    _, model_dir, adapters = tiny_models["llama"]  # no tokenizer.json: the TUI could not encode a prompt
    monkeypatch.setattr(MultiLoRAApp, "run", lambda app: pytest.fail("the TUI started"))
    args = argparse.Namespace(model=model_dir, lora=[f"a4={adapters['a4']}"], device="cpu", backend="torch")
    assert main(args) == 1
    assert "punica demo: error: the demo needs a tokenizer.json" in capsys.readouterr().err


def test_command_line_options(tmp_path):
    args = argparse.Namespace(model=str(tmp_path), lora=None, device="cpu", dtype=None, max_loras=None,
                              block_size=32, prompt=None)
    model, adapters, notice = resolve_models(args)
    assert (model, adapters) == (str(tmp_path), {}) and "base model only" in notice
    assert engine_options(args, 20) == {"device": "cpu", "block_size": 32, "max_loras": 20, "max_cpu_loras": 64}
