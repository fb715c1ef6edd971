"""The package's layers (ARCHITECTURE.md), checked from the source: no module imports a module of a
higher layer, and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "qlora_jax"

# Lowest first; a module belongs to the first layer with a matching prefix (exact names first).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "clis",
        (
            "qlora_jax.train.__main__",
            "qlora_jax.train.cli",
            "qlora_jax.export",
            "qlora_jax.generate",
            "qlora_jax.compare",
            "qlora_jax.quant.report",
        ),
    ),
    ("facade", ("qlora_jax.models.llama",)),
    ("quant", ("qlora_jax.quant",)),
    ("models", ("qlora_jax.models", "qlora_jax.sampling")),
    ("lora/io", ("qlora_jax.lora", "qlora_jax.io", "qlora_jax.sharding")),
    ("data", ("qlora_jax.data",)),
    ("train", ("qlora_jax.train",)),
]
ORDER = ["quant", "models", "lora/io", "data", "train", "clis"]
RANK = {"facade": ORDER.index("lora/io")}  # models/llama.py: the public loader, beside io/
RANK |= {name: i for i, name in enumerate(ORDER)}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return "package"  # qlora_jax/__init__.py


def _imports() -> dict[str, set[str]]:
    """Every qlora_jax module imported anywhere in each module (function bodies too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` names a module when pkg.mod is one
                targets |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_module_has_a_layer():
    assert [m for m in _imports() if _layer(m) == "package"] == ["qlora_jax"]


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
        for m, targets in _imports().items()
        for t in sorted(targets)
        if "package" not in (_layer(m), _layer(t)) and RANK[_layer(t)] > RANK[_layer(m)]
    ]
    assert upward == []


def test_no_import_cycles():
    graph, cycles = _imports(), []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt], on_path | {nxt}, done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert cycles == []
