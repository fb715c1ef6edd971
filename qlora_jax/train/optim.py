"""The optimizer over the adapter tree: clipping, AdamW, HF-style schedules, weight-decay mask,
with a state per adapter leaf so that an offloaded state can visit the device one leaf at a time.

Defaults are HF Trainer's (AdamW betas 0.9/0.999, eps 1e-8, no weight decay, max_grad_norm 1.0);
QLoRA recipes set max_grad_norm=0.3 and lr=2e-4 in their configs. Only A, B and trained biases
are updated; the per-layer LoRA scales are labelled fixed. Weight decay skips biases, as HF does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
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


# How the optimizer state is laid out, kept in each checkpoint's record: a resume or export
# refuses a checkpoint of another layout in one line (before: one state for the whole tree)
STATE_LAYOUT = "adamw-per-adapter-leaf"
# (leaf index, that leaf's optimizer state) -> the state where its update runs (the device)
Fetch = Callable[[int, Any], Any]
# (leaf index, the leaf's new state, its state before the update) -> the state kept (host memory)
Stash = Callable[[int, Any, Any], Any]


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm over the trainable leaves -> AdamW(schedule) on them; scales get zero
    updates. The state is a tuple with one AdamW state per adapter leaf (the tree's leaf
    order), so an offloaded state can visit the device one leaf at a time: `update` takes
    optional `fetch` and `stash` (Fetch, Stash) and then brings a leaf's moments in only once
    the leaf two before it has been stashed (one leaf copied in while another updates), instead
    of all moments at once beside the gradients (for Llama-2-70B at r=16: 1.5 GiB of moments)."""
    adamw = optax.adamw(
        learning_rate(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
    )

    def labels(lora: Any) -> Any:
        return jax.tree.map(lambda trains: "train" if trains else "fixed", trainable_mask(lora))

    per_leaf = optax.multi_transform({"train": adamw, "fixed": optax.set_to_zero()}, labels)
    # the norm over the trainable leaves only, as before the per-leaf state (and as peft clips
    # only its trainable parameters): the fixed scales have gradients too
    clip = (
        optax.masked(optax.clip_by_global_norm(cfg.max_grad_norm), trainable_mask)
        if cfg.max_grad_norm
        else None
    )

    def only(treedef: Any, leaves: list[Any], i: int) -> Any:
        """The tree with leaf i alone (the others None, i.e. absent), so paths and labels hold."""
        return treedef.unflatten([leaf if j == i else None for j, leaf in enumerate(leaves)])

    def init(params: Any) -> tuple[Any, ...]:
        leaves, treedef = jax.tree.flatten(params)
        return tuple(per_leaf.init(only(treedef, leaves, i)) for i in range(len(leaves)))

    def update(
        updates: Any,
        state: tuple[Any, ...],
        params: Any = None,
        fetch: Fetch | None = None,
        stash: Stash | None = None,
        **extra: Any,
    ) -> tuple[Any, tuple[Any, ...]]:
        if clip is not None:
            updates, _ = clip.update(updates, clip.init(updates))
        grads, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        out, new_state = [], []
        for i, leaf_state in enumerate(state):
            if fetch is not None:  # wait for the gradients and for the leaf two before to leave
                leaving = new_state[i - 2] if i >= 2 else updates
                leaf_state, _ = jax.lax.optimization_barrier((leaf_state, leaving))
                leaf_state = fetch(i, leaf_state)
            leaf_update, new = per_leaf.update(only(treedef, grads, i), leaf_state, only(treedef, weights, i))
            out += jax.tree.leaves(leaf_update)
            new_state.append(new if stash is None else stash(i, new, leaf_state))
        return treedef.unflatten(out), tuple(new_state)

    return optax.GradientTransformationExtraArgs(init, update)
