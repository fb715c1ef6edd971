"""Rows from local files (json/jsonl/csv/parquet/txt), HF dataset names, or the built-in demo task."""

from __future__ import annotations

import os
from typing import Any

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
BUILTIN_PREFIX = "builtin:"


def load_rows(spec: str, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """All rows of a data source as dicts.

    spec: a local file (by extension), a local dataset directory, "builtin:addition[:N]" (the
    demo task, generated), or a HF dataset name (needs the hub or its local cache).
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
        dataset = datasets.load_dataset(LOCAL_BUILDERS[ext], data_files=spec, split="train")
    elif os.path.isdir(spec):
        dataset = datasets.load_dataset(spec, split=split)
    elif os.path.sep in spec or spec.startswith("."):
        raise FileNotFoundError(
            f"data source {spec!r} is neither an existing file ({sorted(LOCAL_BUILDERS)}) nor a directory"
        )
    else:
        dataset = datasets.load_dataset(spec, split=split)
    return [dict(row) for row in dataset]
