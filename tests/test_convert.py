"""`punica convert`: a .bin PEFT adapter becomes safetensors that PEFT and Punica load to the same outputs."""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import stat

import pytest
import torch
from safetensors import SafetensorError

from punica import LLM, SamplingParams
from punica.lora.convert import convert_adapter, main

PROMPTS = [[1, 5, 9, 14, 33, 62], [1, 70, 71, 3]]
MAX_TOKENS = 10


def convert_args(adapter_dir, model_dir, out) -> argparse.Namespace:
    return argparse.Namespace(adapter_dir=str(adapter_dir), model=str(model_dir), out=str(out))


def peft_greedy(hf_model, adapter_dir: str, prompt: list[int]) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter_dir).eval()
    inputs = torch.tensor([prompt])
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_TOKENS,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs.shape[1]:].tolist()


def test_bin_adapter_converts_to_safetensors_that_peft_and_punica_agree_on(tiny_models, tmp_path, capsys):
    hf_model, model_dir, adapters = tiny_models["llama"]
    source = adapters["d8"]  # .bin, with rank_pattern and alpha_pattern
    assert os.path.isfile(os.path.join(source, "adapter_model.bin"))
    out = tmp_path / "d8-converted"
    assert main(convert_args(source, model_dir, out)) == 0
    report = capsys.readouterr().out
    assert "gate_proj" in report and "rank 4" in report and "k_proj" in report and "alpha 4" in report, report
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(source, "adapter_config.json")) as f, open(out / "adapter_config.json") as g:
        assert json.load(f) == json.load(g)

    llm = LLM(model=model_dir, lora_modules={"bin": source, "st": str(out)}, dtype="float32", device="cpu",
              backend="torch")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS * 3, params, lora=["bin"] * 2 + ["st"] * 2 + [None] * 2)
    ours_bin, ours_st, base = [o.token_ids for o in outs[:2]], [o.token_ids for o in outs[2:4]], outs[4:]
    assert ours_st == ours_bin
    assert ours_st != [o.token_ids for o in base], "the adapter should change the output"
    assert ours_st == [peft_greedy(hf_model, str(out), p) for p in PROMPTS]


def test_a_fused_module_adapter_is_reported_as_the_file_has_it(tiny_models, tmp_path, capsys):
    """Phi-3's d8 targets qkv_proj (alpha_pattern 4) and gate_up_proj (rank_pattern 4): the report names those
    modules with their own ranks and alphas, not the q/k/v and gate/up parts they are served as."""
    _, model_dir, adapters = tiny_models["phi3"]
    assert main(convert_args(adapters["d8"], model_dir, tmp_path / "out")) == 0
    lines = {line.removeprefix("modules").split()[0]: line
             for line in capsys.readouterr().out.splitlines() if " layers  rank " in line}
    assert set(lines) == {"gate_up_proj", "qkv_proj"}, lines
    assert "rank 4 " in lines["gate_up_proj"] and "alpha 4 " in lines["qkv_proj"], lines


def test_converting_in_place_keeps_the_tensors(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file

    _, model_dir, adapters = tiny_models["llama"]
    work = tmp_path / "b8"
    shutil.copytree(adapters["b8"], work)
    before = load_file(work / "adapter_model.safetensors")
    conversion = convert_adapter(str(work), model_dir)
    after = load_file(work / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert conversion.max_rank == 8 and len(conversion.projections) == 7


@pytest.mark.parametrize("breakage, message", [
    ("other_base", "do not fit the base projection"),
    ("dora", "use_dora"),
    ("no_weights", "neither adapter_model.safetensors nor adapter_model.bin"),
    ("no_model", "missing' does not exist"),
])
def test_broken_adapter_fails_with_a_clear_message(tiny_models, tmp_path, capsys, breakage, message):
    import shutil

    _, model_dir, adapters = tiny_models["llama"]
    work = tmp_path / "adapter"
    shutil.copytree(adapters["d8"], work)
    if breakage == "other_base":  # as if trained on another base model: a wider hidden size
        model_dir = _wider_model(tmp_path, model_dir)
    elif breakage == "dora":
        cfg = json.loads((work / "adapter_config.json").read_text())
        (work / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    elif breakage == "no_weights":
        os.remove(work / "adapter_model.bin")
    elif breakage == "no_model":
        model_dir = str(tmp_path / "missing")
    out = tmp_path / "out"
    assert main(convert_args(work, model_dir, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("punica convert: error:") and message in err, err
    assert not out.exists()


def test_converted_weights_are_as_readable_as_the_config(tiny_models, tmp_path):
    _, model_dir, adapters = tiny_models["llama"]
    old_umask = os.umask(0o022)  # a server running as another user must be able to read the output
    try:
        convert_adapter(adapters["a4"], model_dir, str(tmp_path / "out"))
    finally:
        os.umask(old_umask)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in os.listdir(tmp_path / "out")}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def _wider_model(tmp_path, model_dir: str) -> str:
    cfg = json.loads(open(os.path.join(model_dir, "config.json")).read())
    wider = tmp_path / "wider"
    wider.mkdir()
    (wider / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2 * cfg["hidden_size"]}))
    return str(wider)


def _full_disk_weights(tensors, path, metadata=None):
    open(path, "wb").write(b"\0" * 100)  # what safetensors leaves when the disk fills up mid-file
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _full_disk_config(obj, f, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fails", ["weights", "config"])
@pytest.mark.parametrize("out_exists", [False, True])
def test_a_failed_write_leaves_nothing_behind(tiny_models, tmp_path, capsys, monkeypatch, fails, out_exists):
    _, model_dir, adapters = tiny_models["llama"]
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    if fails == "weights":
        monkeypatch.setattr("punica.lora.convert.save_file", _full_disk_weights)
    else:
        monkeypatch.setattr("punica.lora.convert.json.dump", _full_disk_config)
    assert main(convert_args(adapters["a4"], model_dir, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("punica convert: error: cannot write") and "No space left" in err, err
    assert (os.listdir(out) == []) if out_exists else not out.exists()
