"""Bad input raises the package's own errors naming the cause, and the engine keeps working."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from factories import make_hf_model, make_peft_adapter
from safetensors.torch import load_file, save_file

from punica import LLM, AdapterError, BadRequestError, ConfigError, SamplingParams, UnknownModelError

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_models):
    _, model_dir, adapters = tiny_models["llama"]
    return LLM(model=model_dir, lora_modules={"a4": adapters["a4"]}, device="cpu", max_lora_rank=8)


@pytest.fixture()
def adapter_copy(tiny_models, tmp_path):
    def copy(name: str) -> str:
        dst = str(tmp_path / name)
        shutil.copytree(tiny_models["llama"][2][name], dst)
        return dst
    return copy


def edit_config(path: str, **changes) -> None:
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def still_works(llm: LLM) -> None:
    out = llm.generate([[1, 2, 3, 4]], GREEDY, lora=["a4"])[0]
    assert len(out.token_ids) == 4


UNSUPPORTED = [  # (option, value, what the error says): options Punica does not implement, or that break parity
    ("use_dora", True, "use_dora"), ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "all", "bias"), ("peft_type", "IA3", "peft_type"),
    ("target_modules", ["embed_tokens", "q_proj"], "target_modules"),
    ("layer_replication", [[0, 1], [0, 1]], "layer_replication"), ("lora_bias", True, "lora_bias"),
    ("init_lora_weights", "pissa_niter_4", "base weights"), ("use_qalora", True, "use_qalora"),
    ("target_modules", ["q_proj"], "target_modules .* leave out"),  # the copy has weights for more
    ("layers_to_transform", [0], "layers_to_transform"), ("r", 8, "rank 4 but the config says r=8"),
]
WRONG_TYPES = [  # values of the wrong type, which used to end in tracebacks or be misread
    ("lora_alpha", "16", "lora_alpha must be a finite number, got str '16'"),
    ("lora_alpha", None, "lora_alpha must be a finite number, got NoneType None"),
    ("r", "4", "r must be a positive integer, got str '4'"),  # it read "rank 4 but the config says r=4"
    ("r", 4.5, "r must be a positive integer, got float 4.5"),
    ("rank_pattern", ["q_proj"], "rank_pattern must be an object"),
    ("rank_pattern", {"q_proj": "4"}, "rank_pattern must be an object .* got dict"),
    ("alpha_pattern", {"v_proj": None}, "alpha_pattern must be an object"),
    ("rank_pattern", {"q_proj(": 4}, r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    ("alpha_pattern", {"[v": 4}, r"alpha_pattern key '\[v' is not a valid regular expression"),
    ("peft_type", None, "peft_type must be a string, got NoneType None"),
    ("target_modules", [1, 2], "target_modules must be a module name or regex, a list of module names"),
    ("layers_to_transform", ["0", 1], "layers_to_transform must be a layer index"),  # was a TypeError
    ("layers_to_transform", -1, "layers_to_transform must be a layer index"),
    ("use_rslora", "false", "use_rslora must be true or false, got str 'false'"),  # read as on
    ("use_dora", "false", "use_dora must be true or false"),  # read as DoRA
    ("lora_alpha", 1e30, "lora_alpha / r = 2.5e[+]29"),  # finite, but the outputs were empty text (NaN logits)
]


@pytest.mark.parametrize("option,value,match", UNSUPPORTED + WRONG_TYPES)
def test_bad_adapter_configs_are_refused(llm, adapter_copy, option, value, match):
    path = adapter_copy("a4")
    edit_config(path, **{option: value})
    with pytest.raises(AdapterError, match=match):
        llm.add_lora("bad", path)
    still_works(llm)


@pytest.mark.parametrize("case,match", [("nan", "NaN"), ("int", "floating point"), ("list_config", "JSON object")])
def test_broken_adapter_contents_are_refused(llm, adapter_copy, case, match):
    path = adapter_copy("a4")
    st = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(st)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    if case == "nan":
        tensors[key][0, 0] = float("nan")
    elif case == "int":
        tensors = {k: v.to(torch.int32) for k, v in tensors.items()}
    else:
        json.dump([1, 2], open(os.path.join(path, "adapter_config.json"), "w"))
    save_file(tensors, st)
    with pytest.raises(AdapterError, match=match):
        llm.add_lora("bad", path)
    still_works(llm)


def test_embedding_lora_weights_are_refused(llm, adapter_copy):
    path = adapter_copy("a4")
    st = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(st)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    save_file(tensors, st)
    with pytest.raises(AdapterError, match="embed_tokens.*not a LoRA weight"):
        llm.add_lora("bad", path)
    still_works(llm)


def test_rank_above_maximum(llm, tiny_models):
    with pytest.raises(AdapterError, match="rank 16 exceeds max_lora_rank=8"):
        llm.add_lora("big", tiny_models["llama"][2]["c16"])
    still_works(llm)


def test_adapter_for_another_base_model(llm, tmp_path):
    other = make_hf_model("llama", hidden_size=32, intermediate_size=48)
    path = make_peft_adapter(other, str(tmp_path / "other"), 4, 8, ("q_proj",), 1)
    with pytest.raises(AdapterError, match="do not fit the base projection"):
        llm.add_lora("other", path)
    still_works(llm)


def test_missing_files(llm, adapter_copy, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        llm.add_lora("x", str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("")
    with pytest.raises(AdapterError, match="'.*file' is not a directory"):  # it said "does not exist"
        llm.add_lora("x", str(tmp_path / "file"))
    path = adapter_copy("a4")
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        llm.add_lora("x", path)
    os.remove(os.path.join(path, "adapter_config.json"))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        llm.add_lora("x", path)
    still_works(llm)


def test_truncated_weights_file(llm, adapter_copy):
    path = adapter_copy("a4")
    st = os.path.join(path, "adapter_model.safetensors")
    open(st, "wb").write(open(st, "rb").read()[:100])
    with pytest.raises(AdapterError, match="cannot read the weights"):
        llm.add_lora("x", path)
    still_works(llm)


def test_unknown_adapter_and_bad_requests(llm):
    with pytest.raises(UnknownModelError, match="unknown adapter 'nope'"):
        llm.generate([[1, 2, 3]], GREEDY, lora=["nope"])
    with pytest.raises(BadRequestError, match="context holds"):
        llm.generate([[1] * 300], GREEDY)
    with pytest.raises(BadRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(BadRequestError, match="token ids"):
        llm.generate([[1, 999]], GREEDY)
    with pytest.raises(BadRequestError, match="no tokenizer.json"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(BadRequestError, match="lora entries"):
        llm.generate([[1, 2]], GREEDY, lora=["a4", None])
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(stop=[""]),
                dict(seed=2 ** 64), dict(seed=-2 ** 63 - 1), dict(seed=1.5), dict(max_tokens=True),
                dict(temperature=float("inf")), dict(temperature=float("nan")), dict(stop=5),
                dict(stop_token_ids=[-1]), dict(stop_token_ids=5), dict(repetition_penalty=0),
                dict(repetition_penalty=float("inf")), dict(min_p=-0.1), dict(min_p=1.5)):
        with pytest.raises(BadRequestError):
            SamplingParams(**bad)
    assert SamplingParams(seed=-1).seed == SamplingParams(seed=2 ** 64 - 1).seed == 2 ** 64 - 1  # torch's wrap
    with pytest.raises(BadRequestError, match="SamplingParams"):
        llm.generate([[1, 2]], {"max_tokens": 2})
    with pytest.raises(BadRequestError, match="got bytes"):
        llm.generate([b"w3"], GREEDY)
    assert not llm.engine.has_unfinished()  # a failed generate leaves nothing behind
    still_works(llm)


def test_bad_engine_options(tiny_models):
    _, model_dir, _ = tiny_models["llama"]
    with pytest.raises(ConfigError, match="unknown engine option 'max_lora'"):
        LLM(model=model_dir, device="cpu", max_lora=4)
    with pytest.raises(ConfigError, match="block_size must be a power of two"):
        LLM(model=model_dir, device="cpu", block_size=12)
    with pytest.raises(ConfigError, match="dtype"):
        LLM(model=model_dir, device="cpu", dtype="float8")
    with pytest.raises(ConfigError, match="max_graph_tokens must be positive"):
        LLM(model=model_dir, device="cpu", max_graph_tokens=0)
    with pytest.raises(ConfigError, match="lora_overlap must be one of"):
        LLM(model=model_dir, device="cpu", lora_overlap="both")
    with pytest.raises(ConfigError, match="device must be"):
        LLM(model=model_dir, device="bogus")
    with pytest.raises(ConfigError, match="max_loras must be int, got str"):
        LLM(model=model_dir, device="cpu", max_loras="4")
    with pytest.raises(ConfigError, match="lora_modules must map"):
        LLM(model=model_dir, lora_modules=["a4"], device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device"):
            LLM(model=model_dir, device="cuda")
    with pytest.raises(ConfigError, match="max_waiting must be positive"):
        LLM(model=model_dir, device="cpu", max_waiting=0)
    with pytest.raises(ConfigError, match="cpu_cache_bytes must be positive"):
        LLM(model=model_dir, device="cpu", cpu_cache_bytes=0)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        LLM(model=model_dir, device="cpu", max_model_len=100_000)
    with pytest.raises(ConfigError, match="KV cache's 2 blocks"):
        LLM(model=model_dir, device="cpu", max_model_len=64, num_blocks=2, block_size=16)


@pytest.mark.parametrize("chat", [[], ["--chat"]])
def test_generate_without_tokenizer_says_so(tiny_models, capsys, chat):
    from punica import cli

    _, model_dir, _ = tiny_models["llama"]  # no tokenizer.json, and the CLI takes only text prompts
    assert cli.main(["generate", "--model", model_dir, "--device", "cpu", "--prompt", "w5", *chat]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == "punica generate: error: generate needs a tokenizer.json in the model directory to encode --prompt"


def test_an_unknown_adapter_error_names_at_most_twenty_loaded_ones(tiny_models):
    """With thousands of adapters loaded the 404 body stays short: twenty names, then a count."""
    from punica.lora.manager import LIST_MAX

    _, model_dir, adapters = tiny_models["llama"]
    path = next(iter(adapters.values()))
    llm = LLM(model=model_dir, lora_modules={f"n{i:02d}": path for i in range(LIST_MAX + 5)}, device="cpu")
    with pytest.raises(UnknownModelError, match=r"'n19' and 5 more") as err:
        llm.generate([[1, 2, 3]], GREEDY, lora=["nope"])
    assert "'n20'" not in str(err.value)
