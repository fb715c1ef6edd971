"""The flash path's padding (decoder.causal_padded): cuDNN refuses odd lengths when differentiated,
so causal attention runs on q, k, v padded at the end; it must equal attention on the real length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models.decoder import causal_padded


@pytest.mark.parametrize("window", [None, (4, 0)])
def test_padded_causal_attention_equals_unpadded_in_value_and_gradients(window):
    """Float32 on XLA (the cuDNN kernel needs a GPU): the padded keys sit after every real query,
    so the masked softmax over real keys is the same sum; 1e-6 relative is float32 reordering."""
    b, t, heads, kv_heads, h = 2, 13, 4, 2, 8  # 13: odd, padded to 16
    q, k, v = (
        jax.random.normal(key, (b, t, n, h), jnp.float32)
        for key, n in zip(jax.random.split(jax.random.key(0), 3), (heads, kv_heads, kv_heads), strict=True)
    )
    attend = functools.partial(
        jax.nn.dot_product_attention, is_causal=True, local_window_size=window, implementation="xla"
    )
    padded = causal_padded(attend, 8)
    weights = jax.random.normal(jax.random.key(1), (b, t, heads, h))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask=None) * weights)

    # jitted: one compile per function, not one per eager op (20 s -> 2 s on 2 CPUs)
    value_and_grads = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))  # noqa: E731
    np.testing.assert_allclose(jax.jit(padded)(q, k, v), jax.jit(attend)(q, k, v), rtol=1e-6, atol=1e-6)
    (_, grads), (_, expected) = value_and_grads(padded)(q, k, v), value_and_grads(attend)(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lengths_already_a_multiple_are_not_padded():
    seen = []
    attend = lambda q, k, v, mask=None: seen.append(q.shape) or q  # noqa: E731
    x = jnp.zeros((1, 16, 2, 8))
    causal_padded(attend, 8)(x, x, x)
    causal_padded(attend, 8)(x[:, :15], x[:, :15], x[:, :15])
    assert seen == [(1, 16, 2, 8), (1, 16, 2, 8)]
