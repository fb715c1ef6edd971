"""The jitted QLoRA train step: grads for the adapter tree only, optional micro-batch accumulation,
optimizer state moved from pinned host memory to the device and back when offloaded. The run's
step (make_state_step) applies it to the whole TrainState; make_train_step exposes the bare update.

A batch is a dict of (B, T) arrays: "inputs" (token ids), "targets" (next token ids), "loss_mask"
(1 where the target counts), optional "segment_ids", "positions" and "segment_starts" (B, M + 1)
for packed rows, and "embeddings" (B, T, D), the inputs' rows of an embedding table kept in host
memory (train/embedding_lookup.py). With
accumulation_steps k > 1 every array has a leading micro-batch axis (k, B, T); the loss is the
token-weighted mean over all micro-batches, as one large batch would give.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from qlora_jax import sharding
from qlora_jax.lora import LoraConfig
from qlora_jax.models.decoder import Llama
from qlora_jax.train.loss import chunked_cross_entropy
from qlora_jax.train.optim import OptimConfig
from qlora_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def loss_sum(
    model: Llama,
    lora_cfg: LoraConfig,
    lora: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array | None,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """(summed token loss, loss tokens) of one batch; dropout only when `rng` is given."""
    hidden = model.apply(
        frozen,
        lora,
        batch["inputs"],
        segment_ids=batch.get("segment_ids"),
        segment_starts=batch.get("segment_starts"),
        positions=batch.get("positions"),
        embeddings=batch.get("embeddings"),
        rng=rng,
        lora_dropout=lora_cfg.dropout,
        return_hidden=True,
    )
    return chunked_cross_entropy(
        hidden,
        model.head(frozen, hidden),
        batch["targets"],
        batch["loss_mask"],
        chunk_size,
        model.config.final_logit_softcapping,
    )


def _summed_loss_and_grads(model, lora_cfg, lora, frozen, batch, rng, accumulation_steps, chunk_size):
    """(summed token loss, loss tokens, summed gradients w.r.t. `lora`) over the micro-batches."""

    def micro(lora, micro_batch, key):
        return loss_sum(model, lora_cfg, lora, frozen, micro_batch, key, chunk_size)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if accumulation_steps == 1:
        (total, count), grads = grad_fn(lora, batch, rng)
        return total, count, grads
    keys = None if rng is None else jax.random.split(rng, accumulation_steps)

    def body(carry, xs):
        total, count, grads = carry
        micro_batch, key = xs
        (t, c), g = grad_fn(lora, micro_batch, key)
        return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, lora)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    return jax.lax.scan(body, init, (batch, keys))[0]


def mean_loss_and_grads(
    model, lora_cfg, lora, frozen, batch, rng, accumulation_steps: int, chunk_size: int, mesh=None
):
    """Token-weighted mean loss and its gradient w.r.t. `lora` only (frozen is a plain argument).

    On a `mesh` whose batch axes (data, fsdp) have more than one device the rows are regrouped per
    batch rank (one device of each tensor group) and the sums are mapped over the ranks (vmap, the
    rank axis split over those devices), so each rank's gradients stay its own through the
    backward pass and are added once after it, as DDP's buckets do; left to GSPMD the sum lands
    inside the scanned backward, one all-reduce per layer and loss chunk, each a synchronization
    point of all devices. Each rank draws its own dropout key.
    """
    summed = functools.partial(
        _summed_loss_and_grads, model, lora_cfg, accumulation_steps=accumulation_steps, chunk_size=chunk_size
    )
    axes = _rank_axes(mesh)
    if not axes:
        total, count, grads = summed(lora, frozen, batch, rng)
    else:
        rows_axis = 1 if accumulation_steps > 1 else 0
        ranks = math.prod(mesh.shape[a] for a in axes)
        batch = sharding.single_device_layout(batch, mesh)
        layout = jax.sharding.NamedSharding(mesh, P(*([None] * rows_axis), axes))
        per_rank = jax.tree.map(lambda x: _split_rows(x, rows_axis, ranks, layout), batch)
        keys = None if rng is None else jax.random.split(rng, ranks)
        sums = jax.vmap(summed, in_axes=(None, None, rows_axis, 0))(lora, frozen, per_rank, keys)
        total, count, grads = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
    count = jnp.maximum(count, 1.0)
    return total / count, count, jax.tree.map(lambda g: g / count, grads)


def _rank_axes(mesh: jax.sharding.Mesh | None) -> tuple[str, ...]:
    """The mesh axes that split the batch's rows (none: one rank)."""
    if mesh is None:
        return ()
    return tuple(a for a in sharding.BATCH_AXES if mesh.shape.get(a, 1) > 1)


def _split_rows(x: jax.Array, axis: int, ranks: int, layout: jax.sharding.NamedSharding) -> jax.Array:
    """(..., B, ...) -> (..., ranks, B / ranks, ...): the rows of each batch rank in their own slot,
    that slot on its rank's devices (`layout` splits the new axis over the rank axes)."""
    shape = (*x.shape[:axis], ranks, x.shape[axis] // ranks, *x.shape[axis + 1 :])
    return jax.lax.with_sharding_constraint(x.reshape(shape), layout)


def _memory(shardings: Any, kind: str) -> Any:
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def _mesh(shardings: Any) -> jax.sharding.Mesh | None:
    """The mesh of a sharded run (None: one device)."""
    return getattr(next(iter(jax.tree.leaves(shardings)), None), "mesh", None)


@contextlib.contextmanager
def _laid_out_on(mesh: jax.sharding.Mesh | None):
    """While tracing the step: the mesh and its rules for the model's logical axes in force."""
    if mesh is None:
        yield
        return
    with (
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
        nn.logical_axis_rules(sharding.gathered_rules(mesh)),
    ):
        yield


def _update_fn(
    model: Llama,
    lora_cfg: LoraConfig,
    optim_cfg: OptimConfig,
    optimizer: optax.GradientTransformation,
    opt_state_shardings: Any,
    chunk_size: int,
    skip_nonfinite: bool,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """The pure update (lora, opt_state, frozen, batch, rng) -> (lora, opt_state, metrics)."""
    offload = optim_cfg.offload_state
    if offload and opt_state_shardings is None:
        raise ValueError("offload_state needs opt_state_shardings (see sharding.py)")

    mesh = _mesh(opt_state_shardings)

    def update(lora, opt_state, frozen, batch, rng):
        with _laid_out_on(mesh):
            loss, tokens, grads = mean_loss_and_grads(
                model, lora_cfg, lora, frozen, batch, rng, optim_cfg.accumulation_steps, chunk_size, mesh
            )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        moves = {}
        if offload:
            # each leaf's moments come to the device after the gradients, never during the
            # forward/backward pass (the activation peak), and go back before later leaves come
            on_device, on_host = (
                _memory(opt_state_shardings, "device"),
                _memory(opt_state_shardings, "pinned_host"),
            )
            moves["fetch"] = lambda i, state: jax.device_put(state, on_device[i])
            moves["stash"] = lambda i, new, old: jax.device_put(
                keep(new, old) if skip_nonfinite else new, on_host[i]
            )
        updates, new_opt_state = optimizer.update(grads, opt_state, lora, **moves)
        new_lora = optax.apply_updates(lora, updates)
        if skip_nonfinite:
            new_lora = keep(new_lora, lora)
            if not offload:
                new_opt_state = keep(new_opt_state, opt_state)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm}
        return new_lora, new_opt_state, metrics

    return update


def _state_out(optim_cfg: OptimConfig, opt_state_shardings: Any) -> Any:
    return _memory(opt_state_shardings, "pinned_host") if optim_cfg.offload_state else opt_state_shardings


def make_train_step(
    model: Llama,
    lora_cfg: LoraConfig,
    optim_cfg: OptimConfig,
    optimizer: optax.GradientTransformation,
    opt_state_shardings: Any = None,
    chunk_size: int = 1024,
    lora_shardings: Any = None,
    skip_nonfinite: bool = False,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """jit(train_step)(lora, opt_state, frozen, batch, rng) -> (lora, opt_state, metrics).

    lora and opt_state are donated and come back with the shardings given (None: as XLA
    propagates them). With offload_state, `opt_state_shardings` (the device shardings of the
    state) decide where the state lives: it arrives in pinned host memory, moves to the device
    for the update, and goes back, so between steps it costs no HBM. With skip_nonfinite, a
    step whose loss or gradient norm is NaN or inf returns lora and opt_state unchanged
    (selected on device: no host sync).
    """
    update = _update_fn(
        model, lora_cfg, optim_cfg, optimizer, opt_state_shardings, chunk_size, skip_nonfinite
    )
    out_shardings = (lora_shardings, _state_out(optim_cfg, opt_state_shardings), None)
    return jax.jit(update, donate_argnums=(0, 1), out_shardings=out_shardings)


def state_shardings(
    lora_shardings: Any, opt_state_shardings: Any, optim_cfg: OptimConfig, replicated: Any
) -> TrainState:
    """Where each part of the TrainState lives: adapters and optimizer state as given (the state
    in pinned host memory when offloaded), the counters and key replicated."""
    return TrainState(
        step=replicated,
        lora=lora_shardings,
        opt_state=_state_out(optim_cfg, opt_state_shardings),
        rng=replicated,
        tokens_seen=replicated,
        skipped_steps=replicated,
        data_position=replicated,
    )


class StateStep:
    """step(state, frozen, batch, data_position) -> (state, metrics): one jitted update of the
    whole TrainState (donated), compiled ahead of time per batch shape so that the compiled
    program's memory need is known before it first runs (`memory_analysis`)."""

    def __init__(self, update: Callable[..., Any], shardings: TrainState, skip_nonfinite: bool):
        def state_step(state: TrainState, frozen: Any, batch: Batch, data_position: jax.Array):
            key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
            lora, opt_state, metrics = update(state.lora, state.opt_state, frozen, batch, step_key)
            skipped = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]))
            new_state = TrainState(
                step=state.step + 1,
                lora=lora,
                opt_state=opt_state,
                rng=jax.random.key_data(key),
                tokens_seen=state.tokens_seen + jnp.sum(batch["loss_mask"], dtype=jnp.float32),
                skipped_steps=state.skipped_steps + (skipped.astype(jnp.int32) if skip_nonfinite else 0),
                data_position=data_position,
            )
            return new_state, metrics | {"skipped_steps": new_state.skipped_steps}

        self._jitted = jax.jit(state_step, donate_argnums=0, out_shardings=(shardings, None))
        self._compiled: dict[Any, Any] = {}

    def compile(self, state: TrainState, frozen: Any, batch: Batch, data_position: Any) -> Any:
        """The executable for this batch's shapes (compiled once per shape, as jit would)."""
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in self._compiled:
            self._compiled[key] = self._jitted.lower(state, frozen, batch, data_position).compile()
        return self._compiled[key]

    def __call__(self, state: TrainState, frozen: Any, batch: Batch, data_position: Any):
        return self.compile(state, frozen, batch, data_position)(state, frozen, batch, data_position)


def make_state_step(
    model: Llama,
    lora_cfg: LoraConfig,
    optim_cfg: OptimConfig,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    opt_state_shardings: Any,
    chunk_size: int = 1024,
    skip_nonfinite: bool = False,
) -> StateStep:
    """The run's step over the TrainState: the same update as make_train_step, plus the key
    split, the step and token counters, skipped non-finite steps and the data position."""
    update = _update_fn(
        model, lora_cfg, optim_cfg, optimizer, opt_state_shardings, chunk_size, skip_nonfinite
    )
    return StateStep(update, shardings, skip_nonfinite)


def init_opt_state(
    optimizer: optax.GradientTransformation,
    lora: Any,
    optim_cfg: OptimConfig,
    opt_state_shardings: Any = None,
) -> Any:
    """The optimizer state, placed in pinned host memory when offloaded."""
    return place_opt_state(optimizer.init(lora), optim_cfg, opt_state_shardings)


def place_opt_state(state: Any, optim_cfg: OptimConfig, opt_state_shardings: Any = None) -> Any:
    """Move an optimizer state where the step expects it: its shardings, in pinned host memory
    when offloaded."""
    if not optim_cfg.offload_state:
        return state if opt_state_shardings is None else jax.device_put(state, opt_state_shardings)
    shardings = opt_state_shardings if opt_state_shardings is not None else sharding.default_shardings(state)
    return jax.device_put(state, _memory(shardings, "pinned_host"))
