"""Read and write .safetensors one tensor at a time with plain file I/O (no mmap, bf16 included).

Reading through a memory map would count every touched page of a multi-GB file in the process'
resident memory; reading each tensor into its own buffer keeps host memory to one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file by name."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors file not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + header_len

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r} ({len(self.entries)} tensors in the file)")
        entry = self.entries[name]
        if entry["dtype"] not in DTYPES:
            raise ValueError(
                f"{self.path}: tensor {name} has dtype {entry['dtype']}; readable: {sorted(DTYPES)}"
            )
        dtype = np.dtype(DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            values = np.fromfile(f, dtype=dtype, count=count)
        return values.reshape(entry["shape"])


def write(
    path: str,
    tensors: Iterable[tuple[str, np.ndarray]] | dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors to `path` (atomically via a temporary file); arrays may be bf16."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, array in items:
        array = np.asarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be stored; valid: {sorted(_NAMES)}")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, array in items:
            np.ascontiguousarray(array).tofile(f)
    os.replace(tmp, path)
