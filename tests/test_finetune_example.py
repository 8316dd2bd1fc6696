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


@pytest.mark.parametrize("content, message", [
    (None, "cannot read --data"),
    ("", "holds 0 examples, fewer than --batch-size 2"),
    ('{"topic": "sea", "text": "waves"}\n\n', "holds 1 examples, fewer than --batch-size 2"),
    ('{"topic": "sea", "text": "waves"}\nnot json\n', "line 2 is not"),
    ('{"text": "no topic"}\n', "line 1 is not"),
    ('["sea", "waves"]\n', "line 1 is not"),
    (b"\xff\xfe\n", "cannot read --data"),
])
def test_bad_data_exits_with_a_message_before_loading_the_model(content, message, tmp_path):
    data = tmp_path / "data.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "2",
            "--model", str(tmp_path / "no-model")]  # were the data accepted, this would fail at once
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert str(data) in str(exit_info.value) and message in str(exit_info.value), exit_info.value
