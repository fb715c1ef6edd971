"""The one linear layer: a frozen weight (NF4 or dense, torch (out, in) order) + optional LoRA."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.quant.nf4 import NF4Tensor, dequantize

FrozenWeight = NF4Tensor | jax.Array


def dense_weight(weight: FrozenWeight, dtype: Any) -> jax.Array:
    """The (out, in) weight in `dtype`, dequantized on the fly when it is NF4."""
    if isinstance(weight, NF4Tensor):
        return dequantize(weight, dtype)
    return weight.astype(dtype)


def frozen_matmul(x: jax.Array, weight: FrozenWeight) -> jax.Array:
    """x @ W.T in x's dtype with float32 accumulation; W is never a trainable input here."""
    w_OxI = dense_weight(weight, x.dtype)
    return jnp.einsum("...i,oi->...o", x, w_OxI, preferred_element_type=jnp.float32).astype(x.dtype)


class Linear(nn.Module):
    """y = x W^T (+ bias) for the frozen weight found at this module's path in the `frozen` tree."""

    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.get_variable("frozen", "weight")
        if weight is None:
            raise KeyError(f"frozen tree has no weight for module {'/'.join(self.path)}")
        y = frozen_matmul(x.astype(self.dtype), weight)
        bias = self.get_variable("frozen", "bias")
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y
