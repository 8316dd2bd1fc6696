"""Start a live `punica serve` subprocess on a free loopback port and prepare the files it serves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

API_KEY = "test-key"
BASE = "tiny-llama"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"punica serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"punica serve did not become healthy in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(args: list[str], log_path: str) -> Server:
    """`punica serve ARGS --port <free>` in a subprocess; call wait_ready() before use."""
    port = free_port()
    cmd = [sys.executable, "-m", "punica.cli", "serve", *args, "--port", str(port), "--log-level", "warning"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def prepare_files(llama_dir: str, adapters: dict[str, str], root: str) -> dict:
    """The model with a chat template, an allowed directory of adapter copies (and a broken one), and a
    second allowed directory for the small server."""
    model = os.path.join(root, "model")
    shutil.copytree(llama_dir, model)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(model, "config.json"), "w") as f:  # room for long generations (the small server)
        json.dump({**config, "max_position_embeddings": 4096}, f)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "</s>", "bos_token": "<s>"}, f)
    allowed = os.path.join(root, "allowed")
    for name in ("a4", "c16"):
        shutil.copytree(adapters[name], os.path.join(allowed, f"copy-{name}"))
    dora = os.path.join(allowed, "dora")
    shutil.copytree(adapters["a4"], dora)
    with open(os.path.join(dora, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dora, "adapter_config.json"), "w") as f:
        json.dump({**cfg, "use_dora": True}, f)
    small_allowed = os.path.join(root, "small-allowed")
    for name in ("a4", "b8", "c16"):
        shutil.copytree(adapters[name], os.path.join(small_allowed, name))
    return {"model": model, "allowed": allowed, "small_allowed": small_allowed, "adapters": adapters}


