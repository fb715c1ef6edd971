"""Check `--config.a.b=v` overrides against the recipe before absl parses them, so a typo or a value
of the wrong type gets one line naming the key (and what is valid), not absl's fatal flag error."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags

BAD_INPUT = 2  # exit code of a run stopped by its input (config, model or data)
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "qlora_jax", "jax")
HOST_POOL_SHARE = 0.85  # of the machine's memory: one process per host (README, several GPUs)

# the parsers ml_collections' config flags use for scalar fields: accept exactly what they accept
_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}


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


def _type_error(key: str, raw: str, current: object) -> str | None:
    parser = _PARSERS.get(type(current))
    if parser is None:
        return None
    try:
        parser.parse(raw)
    except (ValueError, flags.Error):
        return f"{key}={raw!r}: expected {type(current).__name__} (the recipe has {current!r})"
    return None


def override_errors(argv: Sequence[str]) -> list[str]:
    """One message per override whose key is not in the recipe or whose value has the wrong type."""
    path = _config_path(argv)
    if path is None:
        return []
    config = load_recipe(path)
    errors = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key, has_value, raw = arg[len("--config.") :].partition("=")
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(parts[:depth]) or "the top level"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                errors.append(f"unknown config key {key!r}: no {part!r} in {parent}; valid there: {valid}")
                break
            node = node[part]
        else:
            if has_value and (message := _type_error(key, raw, node)):
                errors.append(message)
    return errors


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run(main), after the overrides are checked (unknown keys: one line each, exit 2)."""
    try:
        errors = override_errors(sys.argv[1:])
    except FileNotFoundError as err:
        errors = [str(err)]
    if errors:
        print("error: " + "\nerror: ".join(errors), file=sys.stderr)
        sys.exit(BAD_INPUT)
    app.run(main)


def use_compilation_cache() -> None:
    """Keep compiled programs in JAX's persistent cache (~/.cache/qlora_jax/jax unless
    JAX_COMPILATION_CACHE_DIR names another place; JAX_ENABLE_COMPILATION_CACHE=false turns it
    off). A rerun or resume then skips compilation and XLA's GPU autotuning, whose transient
    buffers sit on top of the loaded model: 2.4 GiB above the step's own peak for Llama-3-8B at
    2,048 tokens on H100 (experiments/NOTES.md, issue 18)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(DEFAULT_COMPILATION_CACHE))


def size_host_pool() -> None:
    """Let XLA's GPU client keep offloaded activations in up to 85% of the machine's memory (its
    own default is 64 GB: too small for the layer inputs of Llama-3-8B past ~250k tokens, or
    for offload_attention past ~110k), unless XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB is set. Read
    when the GPU client starts, so call it before anything touches a device."""
    from qlora_jax.models.decoder import HOST_POOL_VARIABLE  # "auto" remat reads it back

    if HOST_POOL_VARIABLE not in os.environ:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        os.environ[HOST_POOL_VARIABLE] = str(int(HOST_POOL_SHARE * memory_gb))
