"""examples/finetune: bad arguments and inputs exit with a message before any training; a short run on a tiny
llama writes an adapter that Punica loads."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"finetune_{name}", os.path.join(ROOT, "examples", "finetune",
                                                                                 f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = load_script("finetune")


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--rank", "0"),
                                         ("--batch-size", "0"), ("--max-len", "0"), ("--alpha", "0"),
                                         ("--log-every", "0"), ("--threads", "0"), ("--warmup", "-1"),
                                         ("--dropout", "1"), ("--raw-fraction", "1.5")])
def test_bad_numbers_are_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--data", "d.jsonl", "--out", "out", flag, value])
    assert exit_info.value.code == 2
    assert f"error: {flag} must be" in capsys.readouterr().err
