"""Run metrics: one JSON object per line in metrics.jsonl, the same scalars in TensorBoard."""

from __future__ import annotations

import importlib
import json
import math
import os
from typing import Any


def optional_package(name: str, skipped: str) -> bool:
    """Whether `name` imports; if not, one warning line saying what the run skips without it
    (called at start, before any weight is read)."""
    try:
        importlib.import_module(name)
    except ImportError:
        print(f"warning: {name} is not installed: {skipped} (pip install {name})")
        return False
    return True


def tensorboard_available() -> bool:
    return optional_package(
        "tensorboardX", "TensorBoard events are skipped, metrics.jsonl holds the same scalars"
    )


class MetricsWriter:
    """Appends to <run_dir>/metrics.jsonl and, with `tensorboard`, to TensorBoard; run_dir None
    writes nothing (processes other than the first of a multi-host run)."""

    def __init__(self, run_dir: str | None, tensorboard: bool = True):
        self.enabled = run_dir is not None
        if not self.enabled:
            return
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step} | {k: float(v) for k, v in values.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close both outputs; later writes and closes do nothing."""
        if not self.enabled:
            return
        self.enabled = False
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, float]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
