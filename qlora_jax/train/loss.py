"""Masked cross-entropy in float32, summed chunk by chunk from the final hidden states.

A (batch, seq, vocab) float32 logits tensor is the largest activation of a small-adapter run
(8 x 2048 x 128256 x 4 B = 8 GiB for Llama 3), so at most one chunk of logits exists at a time.
When differentiated, each chunk's gradient w.r.t. the hidden states is formed right after its
loss, from logits still in hand (the fused linear cross-entropy of Liger and Unsloth): the head's
matmul runs twice per token instead of three times (forward, recompute, backward).

Chunks run along the sequence with every row in each, so rows split over devices stay where they
are: each device scores its own rows against the whole head.
"""

from __future__ import annotations

import functools

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
    soft-capped by `logit_softcap` first (Gemma 2's final_logit_softcapping), as the model's are.
    A chunk holds about `chunk_size` tokens: the same positions of every row."""
    b, t, _ = hidden_BxTxD.shape
    chunk_t = min(t, max(1, chunk_size // b))
    pad = -t % chunk_t
    hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, pad)))
    mask_BxT = jnp.pad(mask_BxT.astype(jnp.float32), ((0, 0), (0, pad)))
    w_VxD = head_VxD.astype(hidden_BxTxD.dtype)
    total = _summed_loss(hidden_BxTxD, w_VxD, targets_BxT, mask_BxT, chunk_t, logit_softcap)
    return total, jnp.sum(mask_BxT)


def _chunk_loss(h_BxCxD, w_VxD, t_BxC, m_BxC, logit_softcap):
    logits_BxCxV = jnp.einsum("bcd,vd->bcv", h_BxCxD, w_VxD, preferred_element_type=jnp.float32)
    logits_BxCxV = soft_cap(logits_BxCxV, logit_softcap)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_BxC - target_BxC) * m_BxC)


def _chunk(i, chunk_t, *arrays):
    return [jax.lax.dynamic_slice_in_dim(x, i * chunk_t, chunk_t, axis=1) for x in arrays]


def _chunk_loop(hidden_BxTxD, w_VxD, targets_BxT, mask_BxT, chunk_t, logit_softcap, with_grad):
    """(summed loss, its gradient w.r.t. the hidden states or None), chunk by chunk: with_grad,
    each chunk's gradient is formed from its logits while they are in hand."""

    def body(i, carry):
        total, grad_BxTxD = carry
        h, t, m = _chunk(i, chunk_t, hidden_BxTxD, targets_BxT, mask_BxT)
        chunk_loss = lambda h: _chunk_loss(h, w_VxD, t, m, logit_softcap)  # noqa: E731
        if grad_BxTxD is None:
            return total + chunk_loss(h), None
        loss, vjp = jax.vjp(chunk_loss, h)
        (grad_h,) = vjp(jnp.ones((), jnp.float32))
        return total + loss, jax.lax.dynamic_update_slice_in_dim(grad_BxTxD, grad_h, i * chunk_t, axis=1)

    n = hidden_BxTxD.shape[1] // chunk_t
    init = (jnp.zeros((), jnp.float32), jnp.zeros_like(hidden_BxTxD) if with_grad else None)
    return jax.lax.fori_loop(0, n, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _summed_loss(hidden_BxTxD, w_VxD, targets_BxT, mask_BxT, chunk_t, logit_softcap):
    """The loss alone (evaluation, or any use that is not differentiated)."""
    return _chunk_loop(hidden_BxTxD, w_VxD, targets_BxT, mask_BxT, chunk_t, logit_softcap, False)[0]


def _summed_loss_fwd(hidden_BxTxD, w_VxD, targets_BxT, mask_BxT, chunk_t, logit_softcap):
    """The loss and, chunk by chunk, its gradient w.r.t. the hidden states (the residual)."""
    return _chunk_loop(hidden_BxTxD, w_VxD, targets_BxT, mask_BxT, chunk_t, logit_softcap, True)


def _summed_loss_bwd(chunk_t, logit_softcap, grad_BxTxD, cotangent):
    """Only the hidden states get a gradient: the head is frozen, targets and mask are data."""
    return grad_BxTxD * cotangent.astype(grad_BxTxD.dtype), None, None, None


_summed_loss.defvjp(_summed_loss_fwd, _summed_loss_bwd)
