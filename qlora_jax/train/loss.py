"""Masked mean cross-entropy in float32, computed chunk by chunk from the final hidden states.

A (batch, seq, vocab) float32 logits tensor is the largest activation of a small-adapter run
(8 x 2048 x 128256 x 4 B = 8 GiB for Llama 3); each chunk's logits are recomputed in backward
instead of being saved, so at most one chunk of logits exists at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlora_jax.models.attention import soft_cap


def chunked_cross_entropy(
    hidden_BxTxD: jax.Array,
    head_VxD: jax.Array,
    targets_BxT: jax.Array,
    mask_BxT: jax.Array,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of loss tokens), both float32; mean = sum / count. Logits are
    soft-capped by `logit_softcap` first (Gemma 2's final_logit_softcapping), as the model's are."""
    d = hidden_BxTxD.shape[-1]
    hidden_NxD = hidden_BxTxD.reshape(-1, d)
    targets_N = targets_BxT.reshape(-1).astype(jnp.int32)
    mask_N = mask_BxT.reshape(-1).astype(jnp.float32)
    n = hidden_NxD.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    hidden_NxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0)))
    targets_N, mask_N = jnp.pad(targets_N, (0, pad)), jnp.pad(mask_N, (0, pad))
    w_VxD = head_VxD.astype(hidden_BxTxD.dtype)

    @jax.checkpoint
    def chunk_loss(h_CxD, t_C, m_C):
        logits_CxV = jnp.einsum("cd,vd->cv", h_CxD, w_VxD, preferred_element_type=jnp.float32)
        logits_CxV = soft_cap(logits_CxV, logit_softcap)
        lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
        target_C = jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]
        return jnp.sum((lse_C - target_C) * m_C)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    chunks = (hidden_NxD.reshape(-1, chunk, d), targets_N.reshape(-1, chunk), mask_N.reshape(-1, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total, jnp.sum(mask_N)
