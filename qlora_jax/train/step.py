"""The jitted QLoRA train step: grads for the adapter tree only, optional micro-batch accumulation,
optimizer state moved from pinned host memory to the device and back when offloaded.

A batch is a dict of (B, T) arrays: "inputs" (token ids), "targets" (next token ids), "loss_mask"
(1 where the target counts), optional "segment_ids" and "positions" for packed rows. With
accumulation_steps k > 1 every array has a leading micro-batch axis (k, B, T); the loss is the
token-weighted mean over all micro-batches, as one large batch would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qlora_jax.lora import LoraConfig
from qlora_jax.models.linear import dense_weight
from qlora_jax.models.llama import Llama
from qlora_jax.train.loss import chunked_cross_entropy
from qlora_jax.train.optim import OptimConfig

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
        positions=batch.get("positions"),
        rng=rng,
        lora_dropout=lora_cfg.dropout,
        return_hidden=True,
    )
    head = dense_weight(model.head_weight(frozen), hidden.dtype)
    return chunked_cross_entropy(hidden, head, batch["targets"], batch["loss_mask"], chunk_size)


def mean_loss_and_grads(model, lora_cfg, lora, frozen, batch, rng, accumulation_steps: int, chunk_size: int):
    """Token-weighted mean loss and its gradient w.r.t. `lora` only (frozen is a plain argument)."""

    def micro(lora, micro_batch, key):
        return loss_sum(model, lora_cfg, lora, frozen, micro_batch, key, chunk_size)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if accumulation_steps == 1:
        (total, count), grads = grad_fn(lora, batch, rng)
    else:
        keys = None if rng is None else jax.random.split(rng, accumulation_steps)

        def body(carry, xs):
            total, count, grads = carry
            micro_batch, key = xs
            (t, c), g = grad_fn(lora, micro_batch, key)
            return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (total, count, grads), _ = jax.lax.scan(body, init, (batch, keys))
    count = jnp.maximum(count, 1.0)
    return total / count, count, jax.tree.map(lambda g: g / count, grads)


def _memory(shardings: Any, kind: str) -> Any:
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def default_shardings(tree: Any) -> Any:
    """Every leaf on the first device (single-device runs); qlora_jax.sharding supplies meshes."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, tree)


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
    offload = optim_cfg.offload_state
    if offload and opt_state_shardings is None:
        raise ValueError("offload_state needs opt_state_shardings (see default_shardings / sharding.py)")

    def train_step(lora, opt_state, frozen, batch, rng):
        loss, tokens, grads = mean_loss_and_grads(
            model, lora_cfg, lora, frozen, batch, rng, optim_cfg.accumulation_steps, chunk_size
        )
        if offload:
            # the barrier makes the host-to-device copy wait for the gradients, so the state
            # never sits on the device during the forward/backward pass (the activation peak)
            grads, opt_state = jax.lax.optimization_barrier((grads, opt_state))
            opt_state = jax.device_put(opt_state, _memory(opt_state_shardings, "device"))
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_lora, new_opt_state = jax.tree.map(keep, (new_lora, new_opt_state), (lora, opt_state))
        if offload:
            new_opt_state = jax.device_put(new_opt_state, _memory(opt_state_shardings, "pinned_host"))
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm}
        return new_lora, new_opt_state, metrics

    state_out = _memory(opt_state_shardings, "pinned_host") if offload else opt_state_shardings
    out_shardings = (lora_shardings, state_out, None)
    return jax.jit(train_step, donate_argnums=(0, 1), out_shardings=out_shardings)


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
    shardings = opt_state_shardings if opt_state_shardings is not None else default_shardings(state)
    return jax.device_put(state, _memory(shardings, "pinned_host"))
