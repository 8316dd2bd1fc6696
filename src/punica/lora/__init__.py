"""LoRA adapters: PEFT loading and validation, device slots, the CPU cache, segment planning."""
