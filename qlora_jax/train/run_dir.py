"""The run directory: refuse to mix two runs, clear it on overwrite, trim metrics on resume."""

from __future__ import annotations

import json
import os
import shutil

from qlora_jax.train.config import ConfigError
from qlora_jax.train.metrics import read_metrics

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "plots", "adapter", "config.json")


def prepare_run_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """A fresh run never mixes into an earlier run's files: refuse, unless resume or overwrite says so."""
    found = [n for n in ("checkpoints", "metrics.jsonl") if os.path.exists(os.path.join(output_dir, n))]
    if found and not resume:
        if not overwrite:
            raise ConfigError(
                f"output_dir={output_dir!r} already holds a run ({', '.join(found)}); continue it with "
                "--config.resume=auto or replace it with --config.overwrite=True"
            )
        for name in RUN_FILES:
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(output_dir, exist_ok=True)


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric rows after `step`: a resumed run writes them again."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def write_json(run_dir: str, name: str, value: object) -> None:
    with open(os.path.join(run_dir, name), "w") as f:
        json.dump(value, f, indent=2)
