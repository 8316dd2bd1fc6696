"""One LLaMA-family model (Llama 2/3, Mistral, Qwen2, Qwen3), the Batch it consumes, and the HF loader."""
