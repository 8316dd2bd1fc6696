"""Imports point downward only (DESIGN.md): clients -> engine -> model -> lora, kv -> ops/config."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "punica"
# each layer may import the layers listed (and itself); config/errors/testing/workload/gguf_files are leaves
ALLOWED = {
    "ops": set(),
    "kv": {"ops"},
    "lora": {"ops"},
    "model": {"ops", "lora"},
    "engine": {"ops", "kv", "lora", "model"},
}
LEAVES = {"config", "errors", "testing", "workload", "gguf_files"}
TORCH_FREE = ["kv/block_manager.py", "engine/scheduler.py", "lora/slots.py", "lora/cache.py"]


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "punica" and len(parts) > 1 else None


def test_layers_import_downward_only():
    bad = []
    for path in ROOT.rglob("*.py"):
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if own not in ALLOWED:
            continue
        for module in imported_modules(path):
            layer = layer_of(module)
            if layer and layer != own and layer not in LEAVES and layer not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_leaves_and_ops_import_nothing_above_them():
    for path in [*(ROOT / f"{leaf}.py" for leaf in LEAVES), *(ROOT / "ops").rglob("*.py")]:
        if not path.exists():
            continue
        above = {layer_of(m) for m in imported_modules(path)} - {None, "ops", "errors", "config"}
        assert not above, f"{path.name} imports {above}"


def test_host_bookkeeping_imports_no_torch():
    for rel in TORCH_FREE:
        mods = imported_modules(ROOT / rel)
        assert not any(m.split(".")[0] == "torch" for m in mods), rel
        for m in mods:  # nor anything of ours that imports torch
            if m.startswith("punica.") and (ROOT / (m.split(".", 1)[1].replace(".", "/") + ".py")).exists():
                inner = imported_modules(ROOT / (m.split(".", 1)[1].replace(".", "/") + ".py"))
                assert not any(x.split(".")[0] == "torch" for x in inner), f"{rel} -> {m} imports torch"
