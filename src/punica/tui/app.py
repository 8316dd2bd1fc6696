"""`punica demo`: one prompt, answered by the base model and every adapter at once, in one engine batch.

A pane per model streams its answer; the status line shows live tokens/s and the batch size. The engine
runs on a background thread (`EngineLoop`); its reports reach the UI thread as messages.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from argparse import Namespace

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Grid, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Input, Static

from punica import CacheConfig, Engine, EngineConfig, LoRAConfig, PunicaError, SamplingParams, SchedulerConfig
from punica.config import parse_lora_specs
from punica.errors import ConfigError
from punica.tui.session import EngineLoop, Progress, chat_stop_ids

FALLBACK_PROMPT = "Tell me about the sea."
DEFAULT_MAX_TOKENS = 128
# greedy decoding makes the small demo model loop; a little seeded sampling reads better and stays reproducible
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_SEED = 0.7, 0.9, 0
BASE_PANE = "base model"


class RoundProgress(Message):
    """An EngineLoop report, delivered on the UI thread."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress


class Pane(VerticalScroll):
    """One model's answer, streamed in."""

    def __init__(self, title: str, **kwargs):
        super().__init__(**kwargs)
        self.border_title = title
        self.answer = ""
        self._body = Static("", classes="answer")

    def compose(self) -> ComposeResult:
        yield self._body

    def reset(self) -> None:
        self.answer = ""
        self.border_subtitle = "…"
        self._body.update(Text(""))

    def append(self, text: str) -> None:
        self.answer += text
        self._body.update(Text(self.answer))
        self.scroll_end(animate=False)


class MultiLoRAApp(App):
    """`models`: None for the base model, else adapter names registered in `engine`."""

    TITLE = "Punica: many LoRA finetunes, one batch"
    CSS = """
    #prompt { margin: 0 1; }
    #notice { color: $warning; padding: 0 2; }
    #panes { grid-gutter: 0 1; padding: 0 1; }
    Pane { border: round $accent; padding: 0 1; }
    #status { background: $boost; padding: 0 2; height: 1; }
    """
    BINDINGS = [("escape", "quit", "Quit")]

    def __init__(self, engine: Engine, models: list[str | None], prompt: str = FALLBACK_PROMPT,
                 params: SamplingParams | None = None, notice: str | None = None, autostart: bool = True):
        super().__init__()
        self.engine = engine
        self.models = models
        self.prompt = prompt
        self.params = params or demo_sampling_params(engine)
        self.notice = notice
        self.autostart = autostart
        self.round_id = 0
        self.rounds_done = 0
        self.loop = EngineLoop(engine, models, self.params, lambda p: self.post_message(RoundProgress(p)))
        self._thread: threading.Thread | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(value=self.prompt, placeholder="Type a prompt and press Enter", id="prompt")
        if self.notice:
            yield Static(Text(self.notice), id="notice")
        with Grid(id="panes"):
            for i, lora in enumerate(self.models):
                yield Pane(lora or BASE_PANE, id=f"pane-{i}")
        yield Static("loading…", id="status")
        yield Footer()

    def on_mount(self) -> None:
        info = self.engine.info
        self.sub_title = f"{os.path.basename(self.engine.config.model.rstrip('/'))} on {info.device} ({info.dtype})"
        grid = self.query_one("#panes", Grid)
        grid.styles.grid_size_columns = min(len(self.models), 3)
        grid.styles.grid_size_rows = -(-len(self.models) // 3)
        self._thread = threading.Thread(target=self.loop.run, name="punica-engine", daemon=True)
        self._thread.start()
        self.set_status("ready: press Enter to send the prompt to every model")
        if self.autostart:
            self.submit(self.prompt)

    def on_unmount(self) -> None:
        self.loop.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.submit(event.value.strip())

    def submit(self, prompt: str) -> None:
        self.prompt = prompt
        for pane in self.query(Pane):
            pane.reset()
        self.round_id = self.loop.submit(prompt)
        self.set_status(f"sending the prompt to {len(self.models)} models in one batch…")

    def on_round_progress(self, message: RoundProgress) -> None:
        p = message.progress
        if p.round_id != self.round_id:
            return  # a report from a round the user has replaced
        for i, text in p.deltas.items():
            self.query_one(f"#pane-{i}", Pane).append(text)
        for i, n in p.pane_tokens.items():
            reason = p.finished.get(i)
            self.query_one(f"#pane-{i}", Pane).border_subtitle = f"{n} tokens" + (f" · {reason}" if reason else "")
        self.set_status(status_line(p, len(self.models)))
        if p.done:
            self.rounds_done += 1

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(Text(text))


def status_line(p: Progress, num_models: int) -> str:
    """Rate and batch size first: they must survive a narrow terminal."""
    if p.error:
        return f"error: {p.error}"
    rate = f"{p.tokens_per_s:.1f} tok/s"
    tokens = f"{p.tokens} tokens in {p.elapsed:.1f} s"
    if p.done:
        return f"done · {rate} · peak batch size {p.peak_batch_size} · {tokens} · {num_models} models, one engine"
    return f"generating · {rate} · batch size {p.batch_size} · {tokens}"


def demo_sampling_params(engine: Engine, max_tokens: int = DEFAULT_MAX_TOKENS,
                         temperature: float = DEFAULT_TEMPERATURE) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=DEFAULT_TOP_P, seed=DEFAULT_SEED,
                          stop_token_ids=chat_stop_ids(engine))


# building the demo from command-line arguments

ENGINE_OPTIONS = frozenset(f.name for cls in (EngineConfig, CacheConfig, SchedulerConfig, LoRAConfig)
                           for f in dataclasses.fields(cls)) - {"model", "cache", "scheduler", "lora"}


def engine_options(args: Namespace, num_adapters: int) -> dict:
    """The engine options `args` sets (attributes named like EngineConfig fields); enough adapter slots
    for every pane to share one batch unless the user chose otherwise."""
    opts = {name: getattr(args, name) for name in ENGINE_OPTIONS if getattr(args, name, None) is not None}
    if "max_loras" not in opts and num_adapters > LoRAConfig.max_loras:
        opts["max_loras"] = num_adapters
        opts.setdefault("max_cpu_loras", max(num_adapters, LoRAConfig.max_cpu_loras))
    return opts


def resolve_models(args: Namespace) -> tuple[str, dict[str, str], str | None]:
    """(model dir, adapters, notice): the demo model and its adapters unless `args` names others."""
    lora = getattr(args, "lora", None)
    adapters = parse_lora_specs(lora) if lora else {}
    if getattr(args, "model", None):
        notice = None if adapters else "No adapters given (--lora NAME=PATH): showing the base model only."
        return args.model, adapters, notice
    try:
        from punica import demo_model
    except ImportError as e:
        raise ConfigError(f"the demo model is unavailable ({e}); pass --model with an HF model directory") from e
    model = demo_model.default_model_dir()
    if lora:
        return model, adapters, None
    adapters = demo_model.demo_adapters()
    notice = None if adapters else (
        f"The demo adapters are missing (looked in {demo_model.demo_adapters_dir()}): showing the base model "
        "only. Train them with examples/finetune/ or pass --lora NAME=PATH.")
    return model, adapters, notice


def default_prompt() -> str:
    try:
        from punica.demo_model import DEMO_PROMPT
    except ImportError:
        return FALLBACK_PROMPT
    return DEMO_PROMPT


def main(args: Namespace) -> int:
    """Build the engine from `args` (see the module docstring) and run the TUI; returns an exit code."""
    try:
        model, adapters, notice = resolve_models(args)
        print(f"punica demo: loading {model} with {len(adapters)} adapter(s)…", file=sys.stderr)
        engine = Engine.from_args(model, adapters, **engine_options(args, len(adapters)))
        if engine.tokenizer is None:  # every prompt typed into the demo is text
            raise ConfigError(f"the demo needs a tokenizer.json in {model!r} to encode its prompts")
        temperature, max_tokens = getattr(args, "temperature", None), getattr(args, "max_tokens", None)
        params = demo_sampling_params(engine, DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                                      DEFAULT_TEMPERATURE if temperature is None else temperature)
    except PunicaError as e:
        print(f"punica demo: error: {e}", file=sys.stderr)
        return 1
    models = [None, *adapters]
    MultiLoRAApp(engine, models, getattr(args, "prompt", None) or default_prompt(), params, notice).run()
    return 0
