"""Text generation over adapter popularity, as in Punica's figure: tokens/s and decode step time against
the step's memory floor, for ours with adapters (`punica`), ours without (`backbone`), and transformers +
PEFT mixed-adapter batches (`hf`).

    python -m benchmarks.bench_textgen_lora --system punica --batch-size 32

Model: the Llama-2-7B architecture with random bf16 weights made on the GPU (no download). Adapters:
LoRA r=16 on all seven projections, random, written as PEFT directories and loaded through the normal
path. Workload: seeded ShareGPT-like lengths (punica.workload.sharegpt_like_lengths), random prompt ids,
every request runs to its drawn output length (ignore_eos). Popularity as in punica.workload.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.harness import (
    RESULTS,
    add_engine_knobs,
    apply_engine_knobs,
    copy_bandwidth,
    environment,
    print_table,
    write_jsonl,
)
from punica import Engine, SamplingParams
from punica.config import KV_CACHE_DTYPES, LORA_OVERLAPS, QUANTIZATIONS
from punica.workload import adapter_indices, sharegpt_like_lengths

LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, torch_dtype="bfloat16",
                bos_token_id=151643, eos_token_id=151645)
SHAPES = {"llama2-7b": LLAMA2_7B, "qwen3-8b": QWEN3_8B}
TITLES = {"llama-2-7b-arch-random": "Llama-2-7B", "qwen3-8b-arch-random": "Qwen3-8B"}  # the plots' model names
TINY = dict(LLAMA2_7B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, torch_dtype="float32")
PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
POPULARITIES = ("distinct", "uniform", "skewed", "identical")


def write_model_dir(root: Path, cfg: dict) -> str:
    path = root / "model"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def write_adapters(root: Path, cfg: dict, n: int, rank: int, dora: bool = False) -> dict[str, str]:
    """`n` random PEFT adapters of rank `rank` on all seven projections; `dora`: DoRA ones (random magnitudes)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}
    paths = {}
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for proj, (d_in, d_out) in dims.items():
                key = f"base_model.model.model.layers.{layer}.{PROJ[proj]}.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.01).bfloat16()
                if dora:
                    tensors[f"{key}.lora_magnitude_vector"] = 1 + 0.1 * torch.rand(d_out, generator=gen)
        path = root / f"lora{i}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=list(dims), bias="none", use_dora=dora)))
        paths[f"lora{i}"] = str(path)
    return paths


class StepMeter:
    """Wraps the engine's scheduler to time decode steps and compute each one's memory floor.

    Engine.step() launches step k and then waits for step k-1's tokens, so in steady state one call lasts
    as long as step k-1 takes on the device: a call's time is charged to the step launched before it."""

    def __init__(self, engine: Engine, weight_bytes: int, adapter_bytes: int, bandwidth: float):
        self.engine, self.weight_bytes, self.adapter_bytes, self.bw = engine, weight_bytes, adapter_bytes, bandwidth
        cfg = engine.model_config
        kv_item = engine.model.layers[0].self_attn.k_cache.element_size()  # the pool's: fp8 with kv_cache_dtype fp8
        self.kv_bytes_per_token = 2 * cfg.num_layers * cfg.kv_size * kv_item
        self.decode_times, self.floors = [], []
        self.other_times, self.other_tokens = [], []  # steps with prefill chunks: time, tokens
        self.previous: tuple[str, float] | None = None  # the step the last call launched: ("decode", its floor)
                                                        # or ("other", its tokens)

    def step(self) -> list:
        schedule = self.engine.scheduler.schedule
        captured = {}

        def spy():
            captured["step"] = step = schedule()
            return step

        self.engine.scheduler.schedule = spy
        t0 = time.perf_counter()
        outs = self.engine.step()
        elapsed = time.perf_counter() - t0
        self.engine.scheduler.schedule = schedule
        if self.previous is not None:
            kind, value = self.previous
            times, values = (self.decode_times, self.floors) if kind == "decode" else (self.other_times,
                                                                                       self.other_tokens)
            times.append(elapsed)
            values.append(value)
        work = captured["step"].work
        self.previous = None
        if work and all(n == 1 for n in work.values()):
            # num_computed is read after the launch: this step's context
            kv = sum(seq.num_computed for seq in work) * self.kv_bytes_per_token
            adapters = len({seq.lora for seq in work if seq.lora}) * self.adapter_bytes
            self.previous = "decode", (self.weight_bytes + kv + adapters) / self.bw
        elif work:
            self.previous = "other", sum(work.values())
        return outs


def run_punica(engine: Engine, lengths, loras, bandwidth: float, adapter_bytes: int) -> dict:
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for n, b in engine.model.named_buffers()
                        if n.endswith("weight_scale"))  # quantization "fp8": a scale per row
    meter = StepMeter(engine, weight_bytes, adapter_bytes, bandwidth)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    for (p_len, o_len), lora in zip(lengths, loras):
        ids = torch.randint(3, vocab, (p_len,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=o_len, temperature=0.0, ignore_eos=True), lora)
    tokens, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in meter.step())
    wall = time.perf_counter() - t0  # the last step read its sampled tokens: the device is idle
    step_ms = 1e3 * sum(meter.decode_times) / max(len(meter.decode_times), 1)
    floor_ms = 1e3 * sum(meter.floors) / max(len(meter.floors), 1)
    decode_s, others = sum(meter.decode_times), max(len(meter.other_times), 1)
    return dict(tokens=tokens, seconds=round(wall, 3), tok_per_s=round(tokens / wall, 1),
                decode_step_ms=round(step_ms, 3), floor_ms=round(floor_ms, 3),
                floor_ratio=round(step_ms / floor_ms, 3) if floor_ms else None, decode_steps=len(meter.decode_times),
                decode_s=round(decode_s, 3), other_s=round(wall - decode_s, 3),  # other: steps with prefill
                other_steps=len(meter.other_times), other_step_ms=round(1e3 * sum(meter.other_times) / others, 3),
                other_step_tokens=round(sum(meter.other_tokens) / others, 1))


def run_hf(cfg: dict, adapters: dict[str, str], batch: int, popularity: str, new_tokens: int, prompt_len: int) -> dict:
    """transformers + PEFT: one batch of `batch` requests with `adapter_names=`, decode tok/s."""
    import transformers
    from peft import PeftModel

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    names = list(adapters)
    idx = adapter_indices(popularity, batch, len(names), seed=0)
    used = sorted(set(idx))
    peft = PeftModel.from_pretrained(model, adapters[names[used[0]]], adapter_name=names[used[0]])
    for i in used[1:]:
        peft.load_adapter(adapters[names[i]], adapter_name=names[i])
    peft = peft.to(dtype).eval()
    ids = torch.randint(3, cfg["vocab_size"], (batch, prompt_len), device=device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  adapter_names=[names[i] for i in idx])
    with torch.no_grad():
        peft.generate(max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm up
        timings = []
        for n in (1, 1 + new_tokens):
            t0 = time.perf_counter()
            peft.generate(max_new_tokens=n, min_new_tokens=n, **kwargs).tolist()  # .tolist(): wait for it
            timings.append(time.perf_counter() - t0)
    step = (timings[1] - timings[0]) / new_tokens  # decode steps only: the prefill cancels out
    return dict(tokens=batch * new_tokens, tok_per_s=round(batch / step, 1), decode_step_ms=round(1e3 * step, 3))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", nargs="+", choices=["punica", "backbone", "hf", "all"], default=["punica"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32])
    ap.add_argument("--popularity", nargs="+", default=list(POPULARITIES), choices=POPULARITIES)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hf-new-tokens", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a tiny fp32 model (smoke test, also on CPU)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b",
                    help="the random model's architecture and sizes; other than llama2-7b, results go to "
                         "textgen_lora_<shape>.jsonl and .png")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--warmup-requests", type=int, default=64,
                    help="an untimed pass per popularity first, so one-time kernel compilation is not measured")
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--lora-overlap", choices=LORA_OVERLAPS, default=None,
                    help="what of the LoRA runs beside the base GEMM (EngineConfig.lora_overlap; default: engine's)")
    ap.add_argument("--lora-stream-priority", type=int, default=None,
                    help="CUDA priority of the LoRA side stream (< 0: above the main stream; default: the engine's)")
    add_engine_knobs(ap)
    ap.add_argument("--kv-cache-dtype", choices=sorted(KV_CACHE_DTYPES), default="auto",
                    help="the KV pool's dtype (CacheConfig.kv_cache_dtype); other than auto, the results go to "
                         "<name>_kv-<dtype>.jsonl/.png")
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                    help="the projections' weights (EngineConfig.quantization); other than none, the results go to "
                         "<name>_w-<quantization>.jsonl/.png")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw textgen_lora.png from the latest 1000-request rows per batch in textgen_lora.jsonl")
    args = ap.parse_args(argv)
    if args.plot_only:
        return replot(Path(args.out_dir or RESULTS))
    knobs = apply_engine_knobs(args)
    cfg = TINY if args.tiny else SHAPES[args.shape]
    name = "textgen_lora" if args.tiny or args.shape == "llama2-7b" else f"textgen_lora_{args.shape}"
    name += "" if args.kv_cache_dtype == "auto" else f"_kv-{args.kv_cache_dtype}"
    name += "" if args.quantization == "none" else f"_w-{args.quantization}"
    model = "tiny" if args.tiny else ("llama-2-7b" if args.shape == "llama2-7b" else args.shape) + "-arch-random"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth() if device == "cuda" else float("nan")
    systems = ["backbone", "punica", "hf"] if "all" in args.system else list(dict.fromkeys(args.system))
    setup = dict(environment(), bench="textgen_lora", model=model,
                 rank=args.rank, num_requests=args.num_requests, max_prompt=args.max_prompt,
                 max_output=args.max_output, copy_bandwidth_GBps=round(bandwidth / 1e9, 1),
                 enforce_eager=args.enforce_eager, warmup_requests=args.warmup_requests,
                 lora_overlap=args.lora_overlap, lora_stream_priority=args.lora_stream_priority,
                 kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization, **knobs)
    rows = []

    def record(row: dict) -> None:  # written as it comes: a run cut short keeps what it measured
        rows.append(row)
        write_jsonl(name, [row], setup, args.out_dir)
        print(row, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_model_dir(root, cfg)
        num_adapters = min(2 * max(args.batch_size), 128)
        adapters = write_adapters(root, cfg, num_adapters, args.rank) if systems != ["backbone"] else {}
        adapter_bytes = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors")) for p in adapters.values())
        adapter_bytes //= max(len(adapters), 1)
        lengths = sharegpt_like_lengths(args.num_requests, seed=0, max_prompt=args.max_prompt,
                                        max_output=args.max_output)
        for batch in args.batch_size:
            run_batch(args, systems, model_dir, adapters, cfg, batch, lengths, bandwidth, adapter_bytes, device, record)
    path = Path(args.out_dir or RESULTS) / f"{name}.png"
    plot(rows, path, setup.get("gpu", "cpu"), TITLES.get(model, model))
    print_table(rows, ["system", "popularity", "batch", "tok_per_s", "decode_step_ms", "floor_ms", "floor_ratio",
                       "decode_s", "other_s", "other_steps", "other_step_ms"])


def run_batch(args, systems, model_dir, adapters, cfg, batch, lengths, bandwidth, adapter_bytes, device, record):
    for system in systems:
        if system == "hf":
            for pop in args.popularity:
                r = run_hf(cfg, adapters, batch, pop, args.hf_new_tokens, prompt_len=128)
                record(dict(system="hf", popularity=pop, batch=batch, **r))
            continue
        overlap = {k: v for k, v in (("lora_overlap", args.lora_overlap),
                                     ("lora_stream_priority", args.lora_stream_priority)) if v is not None}
        # no prefix cache: the warmup and each popularity reuse the same seeded random prompts, whose prefill
        # the cache would serve from the run before
        engine = Engine.from_args(model_dir, adapters if system == "punica" else None, device=device,
                                  load_format="dummy", max_num_seqs=batch, max_loras=max(len(adapters), 1),
                                  max_cpu_loras=max(len(adapters), 1), max_lora_rank=args.rank,
                                  max_num_batched_tokens=max(4096, batch), enforce_eager=args.enforce_eager,
                                  enable_prefix_caching=False, kv_cache_dtype=args.kv_cache_dtype,
                                  quantization=args.quantization, **overlap)
        graphs = engine.runner.graphs
        captured = {} if graphs is None else dict(graphs=len(graphs.graphs), capture_s=round(graphs.capture_s, 2),
                                                   capture_MiB=round(graphs.capture_bytes / 2 ** 20))
        captured.update(kv_blocks=engine.info.num_blocks,
                        step_reserve_MiB=round(engine.info.step_reserve_bytes / 2 ** 20))
        for pop in args.popularity if system == "punica" else ["none"]:
            names = list(adapters)
            loras = ([names[i] for i in adapter_indices(pop, len(lengths), len(names), seed=1)]
                     if system == "punica" else [None] * len(lengths))
            if args.warmup_requests:
                n = args.warmup_requests
                run_punica(engine, [(p, min(o, 16)) for p, o in lengths[:n]], loras[:n], bandwidth, 0)
            r = run_punica(engine, lengths, loras, bandwidth, adapter_bytes if system == "punica" else 0)
            record(dict(system=system, popularity=pop, batch=batch, **r, **captured))
        del engine, graphs  # the graph runner holds the model, and through it the KV pool
        gc.collect()  # free the KV pool and graphs before the next system sizes its own
        torch.cuda.empty_cache() if device == "cuda" else None


def replot(folder: Path) -> None:
    """The plot of the latest full runs: per batch, system and popularity the last row of 1000 requests (hf:
    the last row, any count)."""
    latest = {}
    with open(folder / "textgen_lora.jsonl") as f:
        for row in map(json.loads, f):
            if row.get("num_requests") == 1000 or row["system"] == "hf":
                latest[row["batch"], row["system"], row["popularity"]] = row
    rows = list(latest.values())
    for key in sorted({(r["batch"], r["system"], r["git"]) for r in rows}):
        print("batch {} {}: git {}".format(*key))
    plot(rows, folder / "textgen_lora.png", rows[-1].get("gpu", "cpu") if rows else "cpu")


def plot(rows: list[dict], path: Path, gpu: str, model: str = "Llama-2-7B") -> None:
    """Grouped bars like the seed's textgen figure: tok/s per popularity, one bar per system, per batch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sub = [r for r in rows if r["batch"] == batch]
        systems = [name for name in ("hf", "backbone", "punica") if any(r["system"] == name for r in sub)]
        for j, system in enumerate(systems):
            for i, pop in enumerate(POPULARITIES):
                match = [r for r in sub if r["system"] == system and r["popularity"] in (pop, "none")]
                if match:
                    ax.bar(i + j * 0.8 / len(systems), match[0]["tok_per_s"], 0.8 / len(systems),
                           label=system if i == 0 else None,
                           color={"backbone": "C0", "punica": "C1", "hf": "C2"}[system])
        ax.set_xticks([i + 0.4 - 0.4 / len(systems) for i in range(len(POPULARITIES))], POPULARITIES)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("tokens/s")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)
    fig.suptitle(f"{model} text generation, LoRA r=16 ({gpu})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
