"""The live servers the server tests drive (module scope: started once, in parallel)."""

from __future__ import annotations

import os

import pytest
from live_server import API_KEY, BASE, prepare_files, start_server


@pytest.fixture(scope="module")
def servers(llama_with_tokenizer, tmp_path_factory):
    """{"main": Server, "small": Server, "files": {...}}. main: 2 adapter slots for 4 adapters, an API
    key; small: one running request, one waiting, one slot, one CPU-cached adapter."""
    llama_dir, adapters = llama_with_tokenizer
    root = str(tmp_path_factory.mktemp("server"))
    files = prepare_files(llama_dir, adapters, root)
    common = ["--model", files["model"], "--device", "cpu", "--served-model-name", BASE]
    main = start_server([*common, *(f for n, p in adapters.items() for f in ("--lora", f"{n}={p}")),
                         "--api-key", API_KEY, "--allowed-lora-dir", files["allowed"], "--max-loras", "2",
                         "--max-cpu-loras", "2", "--max-num-seqs", "24", "--num-blocks", "256",
                         "--max-model-len", "256"],
                        os.path.join(root, "main.log"))
    small = start_server([*common, "--allowed-lora-dir", files["small_allowed"], "--max-num-seqs", "1",
                          "--max-num-batched-tokens", "64", "--max-waiting", "1", "--max-loras", "1",
                          "--max-cpu-loras", "1", "--num-blocks", "300", "--max-request-bytes", "100000"],
                         os.path.join(root, "small.log"))
    try:
        main.wait_ready()
        small.wait_ready()
        yield {"main": main, "small": small, "files": files}
    finally:
        main.stop()
        small.stop()
