"""Median wall time of a jitted train step, shared by the GPU benchmarks."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np


def time_train_step(
    train_step: Any, lora: Any, state: Any, frozen: Any, batch: Any, steps: int, warmup: int = 3
):
    """(median seconds per step after `warmup` untimed steps, last metrics). The step is compiled
    ahead of time, outside every timing, so warmup=0 times the very first run (for long contexts,
    where one step takes minutes); each step waits for its outputs."""
    compiled = train_step.lower(lora, state, frozen, batch, None).compile()
    times, metrics = [], None
    for i in range(steps + warmup):
        start = time.perf_counter()
        lora, state, metrics = compiled(lora, state, frozen, batch, None)
        jax.block_until_ready((lora, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times)), metrics
