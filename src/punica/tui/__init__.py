"""The multi-LoRA terminal demo (`punica demo`, `python examples/tui-multi-lora.py`)."""

from punica.tui.app import MultiLoRAApp, main

__all__ = ["MultiLoRAApp", "main"]
