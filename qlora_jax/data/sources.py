"""Rows from local files (json/jsonl/csv/parquet/txt), HF dataset names, or the built-in demo task."""

from __future__ import annotations

import json
import os
from typing import Any

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
BUILTIN_PREFIX = "builtin:"
TEXT_EXTENSIONS = (".json", ".jsonl", ".csv", ".txt")


def check_text_file(path: str) -> None:
    """UTF-8 throughout, not empty, and (.jsonl) one JSON object per line, checked line by line before
    `datasets` parses the file, so an error names the file, the line and the byte offset."""
    json_lines = path.lower().endswith(".jsonl")
    offset, rows = 0, 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not UTF-8: byte 0x{line[err.start]:02x} at byte offset "
                    f"{offset + err.start}; re-encode the file as UTF-8"
                ) from None
            offset += len(line)
            if not text.strip():
                continue
            rows += 1
            if not json_lines:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: malformed JSON line: {err.msg} (column {err.colno})"
                ) from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
    if not rows:
        raise ValueError(f"{path}: empty dataset (no rows)")


def load_rows(spec: str, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """All rows of a data source as dicts.

    spec: a local file (by extension), a local dataset directory, "builtin:addition[:N]" (the
    demo task, generated), or a HF dataset "NAME[:CONFIG[:SPLIT]]" (needs the hub or its local
    cache), e.g. "openai/gsm8k:main:train".
    """
    if not spec:
        raise ValueError(
            "no data source given: set data.train_path (a file, a dataset name, or builtin:addition)"
        )
    if spec.startswith(BUILTIN_PREFIX):
        from qlora_jax.data.demo_task import builtin_rows

        return builtin_rows(spec[len(BUILTIN_PREFIX) :], split, seed)
    import datasets

    ext = os.path.splitext(spec)[1].lower()
    if ext in LOCAL_BUILDERS:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data file not found: {spec}")
        if ext in TEXT_EXTENSIONS:
            check_text_file(spec)
        dataset = datasets.load_dataset(LOCAL_BUILDERS[ext], data_files=spec, split="train")
    elif os.path.isdir(spec):
        dataset = datasets.load_dataset(spec, split=split)
    elif spec.startswith((".", os.path.sep)):
        raise FileNotFoundError(
            f"data source {spec!r} is neither an existing file ({sorted(LOCAL_BUILDERS)}) nor a directory"
        )
    else:
        name, config, hub_split = hub_dataset(spec, split)
        dataset = datasets.load_dataset(name, config, split=hub_split)
    return [dict(row) for row in dataset]


def hub_dataset(spec: str, split: str) -> tuple[str, str | None, str]:
    """(name, config, split) of "NAME[:CONFIG[:SPLIT]]", e.g. "openai/gsm8k:main:test"; without
    a SPLIT the run's role names it ("train", or "eval" for data.eval_path)."""
    name, _, rest = spec.partition(":")
    config, _, hub_split = rest.partition(":")
    return name, config or None, hub_split or split
