"""Fine-tune a style LoRA adapter with PEFT on SmolLM2-135M-Instruct, on the CPU, in minutes.

    python examples/finetune/finetune.py --data ~/.cache/punica/finetune/data/bible.jsonl --out /tmp/bible

Each example from `prepare_data.py` becomes a chat turn ("Tell me about <topic>." -> the passage, with the
model's default system prompt) or, for --raw-fraction of them, plain text; the loss covers only the
reply. The result is a standard PEFT directory (adapter_config.json + adapter_model.safetensors) that
Punica serves as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import stat
import sys
import time

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [
    "Tell me about {t}.",
    "What do you think about {t}?",
    "Write something about {t}.",
    "Say a few words on {t}.",
    "Can you talk about {t}?",
    "What is {t}?",
    "Give me your thoughts on {t}.",
]
SAMPLE_PROMPT = "Tell me about the sea."
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def encode(tok, example: dict, rng: random.Random, max_len: int, raw_fraction: float) -> tuple[list, list]:
    """(input_ids, labels): labels are -100 except on the reply (and its <|im_end|>)."""
    reply = example["text"]
    if rng.random() < raw_fraction:
        prompt_ids, reply_ids = [], tok(reply).input_ids + [tok.eos_token_id]
    else:
        question = rng.choice(QUESTIONS).format(t=example["topic"])
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        prompt_ids, reply_ids = tok(prompt).input_ids, tok(reply + "<|im_end|>\n").input_ids
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + reply_ids)[:max_len]
    return ids, labels


def batches(examples: list[dict], tok, args, rng: random.Random):
    """Endless shuffled batches, padded to their longest sequence."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            rows = [encode(tok, examples[i], rng, args.max_len, args.raw_fraction)
                    for i in order[start:start + args.batch_size]]
            yield collate(rows, tok.pad_token_id)


def collate(rows: list[tuple[list, list]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, :len(row_ids)], labels[r, :len(row_labels)], mask[r, :len(row_ids)] = (
            torch.tensor(row_ids), torch.tensor(row_labels), 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base_model_dir(args.model)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        raise SystemExit(f"finetune: no tokenizer in {model_dir} that transformers can load "
                         f"(tokenizer.json, or a slow tokenizer's files)") from None
    if not tok.chat_template:
        raise SystemExit(f"finetune: the tokenizer of {model_dir} has no chat template, which the chat examples need")
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except OSError as e:  # "Error no file named model.safetensors, or pytorch_model.bin, found in ..."
        raise SystemExit(f"finetune: cannot load the weights of {model_dir}: {e}") from None
    if tok.pad_token is None:  # Llama's tokenizers have none; padding is masked out, so any token will do
        tok.pad_token = tok.eos_token
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, lora_dropout=args.dropout,
                      target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    return tok, get_peft_model(base, lora)


def base_model_dir(model: str | None) -> str:
    """--model, or the demo model converted from the wheel's GGUF; exits with Punica's reason when it is missing
    or not a model Punica serves."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
    from punica.config import read_model_config
    from punica.demo_model import default_model_dir
    from punica.errors import PunicaError

    try:
        model_dir = model or default_model_dir()
        read_model_config(model_dir)
    except PunicaError as e:
        raise SystemExit(f"finetune: {e}") from None
    return model_dir


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to a tenth of --lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tok, examples: list[dict], args) -> dict:
    rng = random.Random(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    start, tokens, recent = time.time(), 0, []
    for step, batch in zip(range(args.steps), batches(examples, tok, args, rng)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            report(step + 1, args.steps, sum(recent) / len(recent), tokens, time.time() - start)
            recent = []
    return {"train_seconds": round(time.time() - start, 1), "train_tokens": tokens}


def report(step: int, total: int, loss: float, tokens: int, elapsed: float) -> None:
    eta = elapsed / step * (total - step)
    log(f"step {step:4d}/{total}  loss {loss:.3f}  {tokens / elapsed:6.0f} tok/s  "
        f"elapsed {elapsed / 60:5.1f} min  eta {eta / 60:5.1f} min")


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int = 60) -> str:
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


def save(model, out: str, args, stats: dict) -> None:
    """Write the adapter beside `out`, then rename it into place: an interrupted or failed save leaves no
    directory at `out` that looks like a complete adapter."""
    partial = os.path.normpath(out) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_adapter(model, partial, args, stats)
        os.replace(partial, out)  # onto a missing or empty directory (check_out saw to that)
    except OSError as e:
        raise SystemExit(f"finetune: cannot write {out}: {e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_adapter(model, out: str, args, stats: dict) -> None:
    """A standard PEFT directory, weights in bf16 (half the size; Punica casts to its own dtype)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    weights = os.path.join(out, "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if not args.model:  # the demo model: its name, not the local cache path of the converted GGUF
        cfg["base_model_name_or_path"] = BASE_NAME
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if os.path.exists(os.path.join(out, "README.md")):
        os.remove(os.path.join(out, "README.md"))  # PEFT's empty model-card template
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump({"args": vars(args), **stats}, f, indent=2)
    os.chmod(weights, stat.S_IMODE(os.stat(cfg_path).st_mode))  # safetensors writes 0600 whatever the umask


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a .jsonl written by prepare_data.py")
    ap.add_argument("--out", required=True, help="PEFT adapter directory to write")
    ap.add_argument("--model", help="HF base model directory (default: the converted SmolLM2 demo model)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, help="lora_alpha (default: 2 * rank)")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=120)  # what the shipped demo adapters used
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128, help="tokens per example, prompt included")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--raw-fraction", type=float, default=0.2, help="examples trained as plain text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP spin-waits on a busy machine")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower)")
    args = ap.parse_args(argv)
    for name in ("rank", "alpha", "steps", "batch_size", "max_len", "lr", "threads", "log_every"):
        value = getattr(args, name)
        if value is not None and not value > 0:  # `not > 0` refuses nan too
            ap.error(f"--{name.replace('_', '-')} must be positive, not {value}")
    if args.warmup < 0:
        ap.error(f"--warmup must be 0 or more, not {args.warmup}")
    if not 0 <= args.dropout < 1:
        ap.error(f"--dropout must be at least 0 and below 1, not {args.dropout}")
    if not 0 <= args.raw_fraction <= 1:
        ap.error(f"--raw-fraction must be between 0 and 1, not {args.raw_fraction}")
    return args


def check_room(tok, examples: list[dict], args) -> None:
    """Exit with a message when --max-len leaves chat examples no reply tokens to learn from (the chat prompt
    fills it): the loss would be NaN and the adapter would learn nothing."""
    rng = random.Random(args.seed)
    chat = [encode(tok, ex, rng, args.max_len, 0.0) for ex in examples[:16]]
    if chat and not any(label != -100 for _, labels in chat for label in labels):
        raise SystemExit(f"finetune: --max-len {args.max_len} leaves no room for the reply after the chat prompt "
                         f"({len(chat[0][0])} tokens or more); raise --max-len")


def read_examples(path: str, batch_size: int) -> list[dict]:
    """The examples of a .jsonl from prepare_data.py; exits with a message naming the file (and line) when it is
    unreadable, malformed, or holds fewer examples than one batch (the batches would never come)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"finetune: cannot read --data {path}: {getattr(e, 'strerror', None) or e}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            example = None
        if not (isinstance(example, dict) and all(isinstance(example.get(k), str) for k in ("topic", "text"))):
            raise SystemExit(f'finetune: {path} line {number} is not {{"topic": "...", "text": "..."}} '
                             f"as prepare_data.py writes")
        examples.append(example)
    if len(examples) < batch_size:
        raise SystemExit(f"finetune: {path} holds {len(examples)} examples, fewer than --batch-size {batch_size}")
    return examples


def check_out(out: str) -> None:
    """Exit before any training when --out is a file or a directory with something in it: nothing is overwritten."""
    if not os.path.lexists(out) or os.path.isdir(out) and not os.listdir(out):
        return
    what = "a directory that is not empty" if os.path.isdir(out) else "a file"
    raise SystemExit(f"finetune: --out {out} is {what}; name a new directory")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_out(args.out)
    try:
        run(args)
    except KeyboardInterrupt:
        raise SystemExit(f"finetune: interrupted; nothing written to {args.out}") from None


def run(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    examples = read_examples(args.data, args.batch_size)
    tok, model = load(args)
    check_room(tok, examples, args)
    log(f"{len(examples)} examples from {args.data}; rank {args.rank}, {args.steps} steps of {args.batch_size}")
    stats = train(model, tok, examples, args)
    model.eval()
    sample = greedy(model, tok, SAMPLE_PROMPT)
    with model.disable_adapter():
        log(f"base    > {greedy(model, tok, SAMPLE_PROMPT)!r}")
    log(f"adapter > {sample!r}")
    save(model, args.out, args, {**stats, "sample_prompt": SAMPLE_PROMPT, "sample": sample})
    log(f"wrote {args.out} in {stats['train_seconds'] / 60:.1f} min of training")


if __name__ == "__main__":
    main()
