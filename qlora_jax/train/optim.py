"""The optax chain over the adapter tree: clipping, AdamW, HF-style schedules, weight-decay mask.

Defaults are HF Trainer's (AdamW betas 0.9/0.999, eps 1e-8, no weight decay, max_grad_norm 1.0);
QLoRA recipes set max_grad_norm=0.3 and lr=2e-4 in their configs. Only A, B and trained biases
are updated; the per-layer LoRA scales are labelled fixed. Weight decay skips biases, as HF does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qlora_jax.lora import trainable_mask

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    schedule: str = "constant"  # after warmup: constant, linear decay to 0, or cosine to 0
    warmup_steps: int = 0
    total_steps: int = 1000  # optimizer steps; the end of linear/cosine decay
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    accumulation_steps: int = 1  # micro-batches per optimizer step
    offload_state: bool = False  # keep AdamW moments in pinned host memory between steps

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} unknown; valid: {SCHEDULES}")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must not exceed total_steps={self.total_steps}"
            )


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    """HF's get_{constant,linear,cosine}_schedule_with_warmup: lr(step), step 0 = first update."""

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(step / max(cfg.warmup_steps, 1), 1.0) if cfg.warmup_steps else 1.0
        progress = jnp.clip((step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1), 0.0, 1.0)
        if cfg.schedule == "linear":
            decay = 1.0 - progress
        elif cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            decay = 1.0
        in_warmup = step < cfg.warmup_steps
        return cfg.lr * jnp.where(in_warmup, warmup, decay)

    return schedule


def _decay_mask(lora: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("a", "b"), lora)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule) on trainable leaves; scales get zero updates."""
    adamw = optax.adamw(
        learning_rate(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
    train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm else adamw

    def labels(lora: Any) -> Any:
        return jax.tree.map(lambda trains: "train" if trains else "fixed", trainable_mask(lora))

    return optax.multi_transform({"train": train, "fixed": optax.set_to_zero()}, labels)
