"""TrainState: everything a run changes, as one pytree the jitted step takes and returns (donated)
and a checkpoint saves and restores whole. The frozen base is not in it: it never changes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from qlora_jax import sharding


@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32: optimizer steps taken
    lora: Any  # the adapter tree
    opt_state: Any  # optax state (in pinned host memory when offloaded)
    rng: jax.Array  # uint32 key data: dropout keys of the next step are split from it
    tokens_seen: jax.Array  # float32: loss tokens trained on
    skipped_steps: jax.Array  # int32: non-finite steps skipped (train.nonfinite=skip)
    data_position: jax.Array  # int32 (epoch, batch index) of the next batch


jax.tree_util.register_dataclass(
    TrainState,
    data_fields=["step", "lora", "opt_state", "rng", "tokens_seen", "skipped_steps", "data_position"],
    meta_fields=[],
)


def _initial_counters(rng: jax.Array) -> dict[str, np.ndarray]:
    """Every field but the adapters and the optimizer state, at step 0."""
    return {
        "step": np.zeros((), np.int32),
        "rng": np.asarray(jax.random.key_data(rng)),
        "tokens_seen": np.zeros((), np.float32),
        "skipped_steps": np.zeros((), np.int32),
        "data_position": np.zeros((2,), np.int32),
    }


def new_state(lora: Any, opt_state: Any, rng: jax.Array, replicated: Any) -> TrainState:
    """Step 0: the placed adapters and optimizer state, the run's key, the data's first batch;
    the counters and key placed whole on every device (`replicated`)."""
    counters = sharding.place(_initial_counters(rng), replicated)
    return TrainState(lora=lora, opt_state=opt_state, **counters)


def abstract_state(lora_like: Any, opt_state_like: Any) -> TrainState:
    """A TrainState of shapes and dtypes around these trees: what a checkpoint restore fills."""
    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _initial_counters(jax.random.key(0))
    )
    return TrainState(lora=lora_like, opt_state=opt_state_like, **shapes)


def data_position(state: TrainState) -> dict[str, int]:
    """The data iterator's position as BatchIterator.restore takes it."""
    epoch, index = np.asarray(state.data_position).tolist()
    return {"epoch": epoch, "index": index}


def counters(state: TrainState) -> dict[str, Any]:
    """(step, tokens_seen, skipped_steps) on the host, for logs and the summary."""
    return {
        "step": int(state.step),
        "tokens_seen": float(state.tokens_seen),
        "skipped_steps": int(state.skipped_steps),
    }
