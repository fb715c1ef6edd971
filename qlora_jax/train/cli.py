"""Check `--config.a.b=v` overrides against the recipe before absl parses them, so a typo gets one
line naming the key and the valid keys next to it, not a traceback from deep inside ml_collections."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import ml_collections


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_recipe(path: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("qlora_jax_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def override_errors(argv: Sequence[str]) -> list[str]:
    """One message per override whose key is not in the recipe (empty when all are valid)."""
    path = _config_path(argv)
    if path is None:
        return []
    config = load_recipe(path)
    errors = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(parts[:depth]) or "the top level"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                errors.append(f"unknown config key {key!r}: no {part!r} in {parent}; valid there: {valid}")
                break
            node = node[part]
    return errors
