"""The one linear layer: a frozen weight (NF4 or dense, torch (out, in) order) + optional LoRA.

The frozen product has a custom VJP: backward dequantizes the weight again to form dx, and saves
only the (4-bit) weight itself, never a 16-bit copy, so training memory keeps the 4-bit base.
Every (tokens, features) product is written in the compute dtype by the matmul itself: XLA's dots
accumulate 16-bit products in float32 and round once at the end, so asking for a float32 result
and casting it would only add a float32 (tokens, features) buffer per projection (112 MiB for one
MLP projection of Llama-3-8B at 2048 tokens) and a pass over it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import nf4
from qlora_jax.quant.nf4 import NF4Tensor, dequantize

FrozenWeight = NF4Tensor | jax.Array

# Logical axes of what a linear layer multiplies with, as flax's logical constraints name them:
# the rows of its frozen weight (an NF4 weight's flat codes and scales: whole rows) and the input
# features of its adapter's A. Whoever lays the model out on a mesh maps them to mesh axes
# (`nn.logical_axis_rules`, `sharding.gathered_rules`: under fsdp, the whole weight on every
# device, gathered 4-bit); with no rules and mesh in force they are no-ops.
WEIGHT_ROWS = "weight_rows"
ADAPTER_IN = "adapter_in"


def laid_out(weight: FrozenWeight) -> FrozenWeight:
    """The frozen weight as the matmul wants it: in device memory (a table kept in host memory,
    `frozen.tables_in_host_memory`, is copied in) and laid out (a no-op without a mesh's rules)."""
    weight = on_device(weight)
    if isinstance(weight, NF4Tensor):
        flat = lambda x: None if x is None else nn.with_logical_constraint(x, (WEIGHT_ROWS,))  # noqa: E731
        return dataclasses.replace(
            weight,
            packed=flat(weight.packed),
            absmax=flat(weight.absmax),
            nested_absmax=flat(weight.nested_absmax),
        )
    return nn.with_logical_constraint(weight, (WEIGHT_ROWS, None))


def on_device(tree: Any) -> Any:
    """`tree` with every leaf held in host memory copied to device memory (others untouched)."""
    host = lambda x: jax.typeof(x).memory_space == jax.memory.Space.Host  # noqa: E731
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device) if host(x) else x, tree)


def dense_weight(weight: FrozenWeight, dtype: Any) -> jax.Array:
    """The (out, in) weight in `dtype`, dequantized on the fly when it is NF4."""
    if isinstance(weight, NF4Tensor):
        return dequantize(weight, dtype)
    return weight.astype(dtype)


def _pieces(weight: FrozenWeight, axis: int, slices: int) -> int:
    """How many slices along `axis` a weight is dequantized in: `slices` where the NF4 blocks
    allow it, else 1 (the whole weight at once; dense weights are never sliced)."""
    if slices > 1 and isinstance(weight, NF4Tensor) and nf4.can_slice(weight, axis, slices):
        return slices
    return 1


def _product(x: jax.Array, weight: FrozenWeight, axis: int, slices: int) -> jax.Array:
    """x times W over W's other axis: x @ W.T (axis 0, forward) or dy @ W (axis 1, input
    gradient); the result's features are W's `axis`. With slices > 1 an NF4 W is dequantized a
    block of that axis at a time, each block writing its own part of the result."""
    spec = "...i,oi->...o" if axis == 0 else "...o,oi->...i"
    pieces = _pieces(weight, axis, slices)
    if pieces == 1:
        return jnp.einsum(spec, x, dense_weight(weight, x.dtype))
    size = weight.shape[axis] // pieces

    def part(i: jax.Array, out: jax.Array) -> jax.Array:
        w_block = nf4.dequantize_slice(weight, axis, i * size, size, x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.einsum(spec, x, w_block), i * size, axis=-1)

    return jax.lax.fori_loop(0, pieces, part, jnp.zeros((*x.shape[:-1], weight.shape[axis]), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def frozen_matmul(x: jax.Array, weight: FrozenWeight, slices: int = 1) -> jax.Array:
    """x @ W.T in x's dtype (float32 accumulation); W is a constant of training (no dW). With
    slices > 1 only 1/slices of a dequantized NF4 weight is alive at a time, forward and back."""
    return _product(x, weight, 0, slices)


def _frozen_matmul_fwd(x, weight, slices):
    return _product(x, weight, 0, slices), weight  # the residual is the stored (4-bit) weight, nothing more


def _zero_cotangent(leaf: jax.Array) -> jax.Array:
    if jnp.issubdtype(leaf.dtype, jnp.integer):
        return np.zeros(leaf.shape, jax.dtypes.float0)
    return jnp.zeros_like(leaf)


def _frozen_matmul_bwd(slices, weight, dy):
    dx = _product(dy, weight, 1, slices)  # the weight dequantized again here, freed right after
    return dx, jax.tree.map(_zero_cotangent, weight)


frozen_matmul.defvjp(_frozen_matmul_fwd, _frozen_matmul_bwd)


@jax.custom_vjp
def lora_delta(h: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """scale * (h A) B in h's dtype, float32 accumulation, A and scale * B (float32 masters) cast
    to h's dtype.

    The custom VJP keeps every (tokens, features) tensor in h's dtype and forms dA, dB as
    float32 (features, r) products: autodiff of the same expression would hold float32
    (tokens, out) cotangents, 86 MiB per MLP projection at 2048 tokens of Llama-2-7B.
    """
    return _lora_delta_fwd(h, a, b, scale)[0]


def _lora_delta_fwd(h, a, b, scale):
    u = jnp.einsum("...i,ir->...r", h, a.astype(h.dtype))
    return jnp.einsum("...r,ro->...o", u, (scale * b).astype(h.dtype)), (h, u, a, b, scale)


def _lora_delta_bwd(residuals, dy):
    h, u, a, b, scale = residuals
    f32 = jnp.float32
    db = scale * jnp.einsum("...r,...o->ro", u, dy, preferred_element_type=f32)
    du = jnp.einsum("...o,ro->...r", dy, (scale * b).astype(dy.dtype)).astype(h.dtype)
    da = jnp.einsum("...i,...r->ir", h, du, preferred_element_type=f32)
    dh = jnp.einsum("...r,ir->...i", du, a.astype(h.dtype))
    return dh, da.astype(a.dtype), db.astype(b.dtype), jnp.zeros_like(scale)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class Linear(nn.Module):
    """y = x W^T + b + scale * dropout(x) A B, with W (and b) from `frozen`, A, B from `lora`.

    Adapters follow peft's LoRA layer; a `bias` in the adapter (trainable bias) replaces the
    frozen one. Dropout runs only when a "dropout" rng is given.
    """

    dtype: Any = jnp.bfloat16
    dropout: float = 0.0
    dequant_slices: int = 1  # > 1: an NF4 weight is dequantized this many slices at a time

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.get_variable("frozen", "weight")
        if weight is None:
            raise KeyError(f"frozen tree has no weight for module {'/'.join(self.path)}")
        x = x.astype(self.dtype)
        y = frozen_matmul(x, laid_out(weight), self.dequant_slices)
        bias = self.get_variable("lora", "bias")
        if bias is None:
            bias = self.get_variable("frozen", "bias")
        if bias is not None:
            y = y + bias.astype(self.dtype)
        a = self.get_variable("lora", "a")
        if a is None:
            return y
        h = x
        if self.dropout > 0.0 and self.has_rng("dropout"):
            h = nn.Dropout(self.dropout, deterministic=False)(h, rng=self.make_rng("dropout"))
        b, scale = self.get_variable("lora", "b"), self.get_variable("lora", "scale")
        a = nn.with_logical_constraint(a, (ADAPTER_IN, None))
        b = nn.with_logical_constraint(b, (None, WEIGHT_ROWS))
        return y + lora_delta(h, a, b, scale)
