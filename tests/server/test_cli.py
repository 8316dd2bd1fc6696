"""The `punica` CLI: flags generated from the config dataclasses, `generate`, and the hand-off to demo/convert."""

from __future__ import annotations

import dataclasses

import pytest

from punica import LLM, CacheConfig, EngineConfig, LoRAConfig, SamplingParams, SchedulerConfig, cli, engine_config
from punica.config import ServerConfig, parse_lora_specs


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def flag_dests(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions}


@pytest.mark.parametrize("command", ["serve", "generate", "demo"])
def test_every_engine_field_has_a_flag(command):
    fields = {f.name for cls in cli.ENGINE_SECTIONS for f in dataclasses.fields(cls)} - {"cache", "scheduler", "lora"}
    assert fields <= flag_dests(command)
    if command == "serve":
        assert {f.name for f in dataclasses.fields(ServerConfig)} <= flag_dests(command)


def test_flags_left_out_keep_the_dataclass_defaults():
    args = parse("serve", "--model", "m")
    assert cli.engine_options(args) == {}
    assert ServerConfig(**cli.given(args, ServerConfig)) == ServerConfig()
    assert ServerConfig().host == "127.0.0.1" and ServerConfig().port == 8000


def test_flags_map_to_config_fields_with_their_types():
    args = parse("serve", "--model", "m", "--max-loras", "3", "--max-cpu-loras", "5", "--block-size", "32",
                 "--allowed-lora-dir", "/a", "--allowed-lora-dir", "/b", "--enforce-eager", "--dtype", "float32",
                 "--memory-fraction", "0.5", "--api-key", "k", "--port", "0")
    cfg = engine_config(model="m", **cli.engine_options(args))
    assert cfg.lora == dataclasses.replace(LoRAConfig(), max_loras=3, max_cpu_loras=5, allowed_lora_dirs=("/a", "/b"))
    assert cfg.cache == dataclasses.replace(CacheConfig(), block_size=32, memory_fraction=0.5)
    assert cfg.scheduler == SchedulerConfig() and cfg.enforce_eager and cfg.dtype == "float32"
    assert cfg == dataclasses.replace(EngineConfig(), model="m", dtype="float32", enforce_eager=True,
                                      cache=cfg.cache, lora=cfg.lora)
    assert ServerConfig(**cli.given(args, ServerConfig)) == ServerConfig(api_key="k", port=0)
    with pytest.raises(SystemExit):
        parse("serve", "--dtype", "float8")
    with pytest.raises(SystemExit):  # --help lists the choices
        parse("serve", "--load-format", "gguf")
    assert cli.engine_options(parse("serve", "--load-format", "dummy")) == {"load_format": "dummy"}


def test_sampling_flags_of_generate():
    args = parse("generate", "--prompt", "p", "--max-tokens", "4", "--temperature", "0", "--stop", "a", "--stop",
                 "b", "--sampling-seed", "3", "--seed", "9", "--ignore-eos")
    params = SamplingParams(**cli.given(args, SamplingParams, cli.SAMPLING_PREFIX))
    assert params == SamplingParams(max_tokens=4, temperature=0.0, stop=("a", "b"), seed=3, ignore_eos=True)
    assert cli.engine_options(args) == {"seed": 9}
    schema = '{"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}'
    args = parse("generate", "--prompt", "p", "--json-schema", schema)
    assert SamplingParams(**cli.given(args, SamplingParams, cli.SAMPLING_PREFIX)).json_schema == schema
    assert SamplingParams(**cli.given(parse("generate", "--prompt", "p", "--json-object"), SamplingParams,
                                      cli.SAMPLING_PREFIX)).json_object


def test_lora_specs_and_per_prompt_adapters():
    assert parse_lora_specs(["a=/x/y", "/p/q/"]) == {"a": "/x/y", "q": "/p/q/"}
    assert cli.generation_loras(["a"], 3) == ["a", "a", "a"]
    assert cli.generation_loras(["a", "none"], 2) == ["a", None]
    assert cli.generation_loras(None, 2) == [None, None]
    with pytest.raises(Exception, match="once per --prompt"):
        cli.generation_loras(["a", "b"], 3)


def test_generate_prints_what_the_engine_generates(llama_with_tokenizer, capsys):
    model, adapters = llama_with_tokenizer
    rc = cli.main(["generate", "--model", model, "--device", "cpu", "--lora", f"b8={adapters['b8']}",
                   "--prompt", "w5 w6", "--prompt", "w7", "--use-lora", "b8", "--use-lora", "none",
                   "--max-tokens", "5", "--temperature", "0", "--ignore-eos"])
    out = capsys.readouterr().out
    llm = LLM(model=model, lora_modules={"b8": adapters["b8"]}, device="cpu")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    expected = llm.generate(["w5 w6", "w7"], params, lora=["b8", None])
    assert rc == 0
    assert out.splitlines()[1] == expected[0].text and out.splitlines()[3] == expected[1].text
    assert "--- b8 |" in out and "--- base model |" in out


def test_generate_prints_each_tokens_logprobs_when_asked(llama_with_tokenizer, capsys):
    model, _ = llama_with_tokenizer
    assert cli.main(["generate", "--model", model, "--device", "cpu", "--prompt", "w5 w6", "--max-tokens", "4",
                     "--temperature", "0", "--ignore-eos", "--logprobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    llm = LLM(model=model, device="cpu")
    expected = llm.generate(["w5 w6"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2))[0]
    assert lines[1] == expected.text and lines[2] == "output logprobs:" and len(lines) == 3 + 4
    text = llm.engine.tokenizer.token_text  # w<id>, or <s> for 1 (special tokens are shown too)
    for line, lp in zip(lines[3:], expected.logprobs):
        (t1, v1), (t2, v2) = lp.top
        assert line == f"  {text(lp.token_id)!r} {lp.logprob:.3f}   top:  {text(t1)!r} {v1:.3f}  {text(t2)!r} {v2:.3f}"


def test_errors_exit_with_a_message_not_a_traceback(llama_with_tokenizer, capsys):
    model, _ = llama_with_tokenizer
    assert cli.main(["generate", "--model", model, "--device", "cpu", "--prompt", "w5", "--use-lora", "nope"]) == 1
    assert "punica generate: error:" in capsys.readouterr().err
    assert cli.main(["serve", "--model", model, "--device", "cpu", "--lora", "x=/does/not/exist"]) == 1
    assert "does not exist" in capsys.readouterr().err
    for flags, message in ((["--served-model-name", " "], "served_model_name must not be empty"),
                           (["--allowed-lora-dir", "/does/not/exist"], "is not a directory"),
                           (["--max-request-bytes", "0"], "max_request_bytes must be positive"),
                           (["--device", "cuda:7"], "CUDA device")):
        assert cli.main(["serve", "--model", model, *flags]) == 1
        err = capsys.readouterr().err
        assert "punica serve: error:" in err and message in err, err


def test_demo_and_convert_hand_their_arguments_over(monkeypatch):
    seen = {}
    import punica.demo_model
    import punica.lora.convert
    import punica.tui.app

    monkeypatch.setattr(punica.tui.app, "main", lambda args: seen.setdefault("demo", args) and 0)
    monkeypatch.setattr(punica.lora.convert, "main", lambda args: seen.setdefault("convert", args) and 0)
    monkeypatch.setattr(punica.demo_model, "default_model_dir", lambda: "/demo/model")
    assert cli.main(["demo", "--model", "m", "--lora", "a=/p", "--max-loras", "2", "--prompt", "hi"]) == 0
    demo = seen["demo"]
    assert (demo.model, demo.lora, demo.max_loras, demo.prompt, demo.max_tokens) == ("m", ["a=/p"], 2, "hi", None)
    assert cli.main(["convert", "/adapter", "--out", "/out"]) == 0
    conv = seen["convert"]
    assert (conv.adapter_dir, conv.model, conv.out) == ("/adapter", "/demo/model", "/out")


def test_without_model_the_demo_model_and_adapters_are_used(monkeypatch):
    import punica.demo_model

    monkeypatch.setattr(punica.demo_model, "default_model_dir", lambda: "/demo/model")
    monkeypatch.setattr(punica.demo_model, "demo_adapters", lambda: {"shakespeare": "/demo/s"})
    assert cli.resolve_model(parse("serve")) == ("/demo/model", {"shakespeare": "/demo/s"})
    assert cli.resolve_model(parse("serve", "--lora", "x=/x")) == ("/demo/model", {"x": "/x"})
    assert cli.resolve_model(parse("serve", "--model", "/m")) == ("/m", {})
