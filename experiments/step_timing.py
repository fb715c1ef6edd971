"""Median wall time of a jitted train step, shared by the GPU benchmarks."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np


def peak_gib() -> float:
    """The device's peak allocation so far (XLA cannot reset it: read it between phases)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30


def time_train_step(
    train_step: Any,
    lora: Any,
    state: Any,
    frozen: Any,
    batch: Any,
    steps: int,
    warmup: int = 3,
    profile_dir: str = "",
):
    """(median seconds per step after `warmup` untimed steps, last metrics, XLA's memory plan in
    GiB). The step is compiled ahead of time, outside every timing, so warmup=0 times the very
    first run (for long contexts, where one step takes minutes); each step waits for its outputs.
    With `profile_dir`, two more steps run under jax.profiler after the timed ones and
    plan["profile"] holds their per-device breakdown (trace_summary.py)."""
    start = time.perf_counter()
    compiled = train_step.lower(lora, state, frozen, batch, None).compile()
    analysis = compiled.memory_analysis()
    plan = {
        f"xla_{name}_gib": getattr(analysis, f"{name}_size_in_bytes", 0) / 2**30
        for name in ("argument", "temp", "host_temp", "host_argument")
    }
    plan["peak_after_compile_gib"] = peak_gib()
    plan["compile_s"] = time.perf_counter() - start
    if steps + warmup == 0:  # compile only (fills the persistent compilation cache)
        return float("nan"), None, plan
    times, metrics = [], None
    for _ in range(steps + warmup):
        start = time.perf_counter()
        lora, state, metrics = compiled(lora, state, frozen, batch, None)
        jax.block_until_ready((lora, metrics))
        times.append(time.perf_counter() - start)
    plan["first_step_s"] = times[0]
    if profile_dir:
        import trace_summary

        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(2):
                lora, state, metrics = compiled(lora, state, frozen, batch, None)
                jax.block_until_ready((lora, metrics))
        plan["profile"] = trace_summary.summarize(profile_dir, steps=2)
    return float(np.median(times[warmup:])), metrics, plan
