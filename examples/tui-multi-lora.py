"""The seed's demo command: one prompt, the base model and every adapter answering side by side in one batch.

    python examples/tui-multi-lora.py                       # SmolLM2-135M-Instruct + the demo adapters
    python examples/tui-multi-lora.py --model DIR --lora a=PATH --lora b=PATH --prompt "Hello"

Same as `punica demo`.
"""

import argparse
import sys

from punica.tui.app import main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model directory (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="a PEFT adapter to compare (repeatable; default: the demo adapters)")
    p.add_argument("--prompt", help="the prompt filled in at start")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: 0.7, seeded)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--backend", choices=["auto", "torch", "triton"])
    p.add_argument("--max-loras", type=int, help="adapter slots on the device")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main(parse_args()))
