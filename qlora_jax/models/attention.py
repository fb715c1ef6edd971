"""Attention masks (causal, padding, packed segments, KV cache), positions derived from them,
cuDNN's flash attention over packed rows, and Gemma's tanh soft-capping (of attention scores and
of logits)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# JAX's cuDNN attention with per-row segment offsets (its public dot_product_attention takes no
# packed layout); imported for the GPU path, CPU-safe
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions that restart at 0 where the segment id changes (packed sequences)."""
    t = jnp.arange(segment_ids_BxT.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]],
        axis=1,
    )
    start_index = jax.lax.cummax(jnp.where(starts, t[None, :], 0), axis=1)
    return t[None, :] - start_index


def padded_positions(attention_mask_BxT: jax.Array, offset_B: jax.Array | int = 0) -> jax.Array:
    """Positions that count only real tokens (left padding gets position 0), as HF generate."""
    counted = jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(counted, 0) + jnp.asarray(offset_B).reshape(-1, 1)


def _causal(query_slots: jax.Array, key_slots: jax.Array, window: int | None) -> jax.Array:
    """(T, S): key at or before the query, and within the sliding window when there is one."""
    mask = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        mask &= key_slots[None, :] > query_slots[:, None] - window
    return mask


def self_attention_mask(
    attention_mask_BxT: jax.Array | None,
    segment_ids_BxT: jax.Array | None,
    length: int,
    window: int | None = None,
) -> jax.Array | None:
    """(B, 1, T, T) bool mask, or None when plain causal attention suffices (the flash path)."""
    if attention_mask_BxT is None and segment_ids_BxT is None:
        return None
    mask = _causal(jnp.arange(length), jnp.arange(length), window)[None, None]
    if attention_mask_BxT is not None:
        mask = mask & attention_mask_BxT.astype(bool)[:, None, None, :]
    if segment_ids_BxT is not None:
        mask = mask & (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
    return mask


def cache_attention_mask(
    key_valid_BxS: jax.Array, write_index: jax.Array, length: int, window: int | None = None
) -> jax.Array:
    """(B, 1, T, S) bool mask for T new queries written at cache slots [write_index, write_index+T)."""
    causal_TxS = _causal(write_index + jnp.arange(length), jnp.arange(key_valid_BxS.shape[1]), window)
    return causal_TxS[None, None] & key_valid_BxS[:, None, None, :]


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention scores and final logits); x itself when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def softcapped_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    mask: jax.Array | None = None,
    *,
    softcap: float,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: tuple[int, int] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """jax.nn.dot_product_attention's XLA path (same arguments, grouped-query heads) with the
    scores soft-capped before the mask, as transformers' Gemma 2 eager attention; softmax in float32."""
    if implementation not in (None, "xla"):
        raise ValueError(f"soft-capped attention runs on XLA only, not {implementation!r}")
    batch, length, heads, head_dim = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    q = q_BxTxNxH.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH, preferred_element_type=jnp.float32)
    scores = soft_cap(scores * (head_dim**-0.5 if scale is None else scale), softcap)
    if mask is None and is_causal:
        window = None if local_window_size is None else local_window_size[0] + 1
        mask = _causal(jnp.arange(length), jnp.arange(k_BxSxKxH.shape[1]), window)[None, None]
    if mask is not None:  # (B, 1, T, S): the same for every head
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
    return out.reshape(batch, length, heads, head_dim)


class PackedLayout(NamedTuple):
    """Packed rows as cuDNN's flash attention takes them: per row, each sequence's first index
    (B, M + 1) and length (B, M), -1 in the slots after the last; every other token is padding."""

    offsets: jax.Array
    lengths: jax.Array


def packed_layout(segment_starts_BxS: jax.Array) -> PackedLayout:
    """The layout of rows whose segment_starts (the data pipeline's: each sequence's start, then
    the end of the last, -1 after) hold M + 1 slots."""
    starts, ends = segment_starts_BxS[:, :-1], segment_starts_BxS[:, 1:]
    used = ends >= 0
    offsets = jnp.where(used, starts, -1)
    unused_slot = jnp.full_like(offsets[:, :1], -1)
    return PackedLayout(jnp.concatenate([offsets, unused_slot], axis=1), jnp.where(used, ends - starts, -1))


def packed_flash_attention(
    q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, layout: PackedLayout, scale=None
) -> jax.Array:
    """Causal attention inside each packed sequence, on cuDNN's flash kernel (grouped-query heads
    as is). Padding tokens, in no sequence, are zero in and out: the kernel leaves their output
    unwritten, and no gradient reaches them."""
    length, head_dim = q_BxTxNxH.shape[1], q_BxTxNxH.shape[-1]
    end = jnp.max(jnp.where(layout.lengths > 0, layout.offsets[:, :-1] + layout.lengths, 0), axis=1)
    real = (jnp.arange(length)[None, :] < end[:, None])[:, :, None, None]
    q, k, v = (jnp.where(real, t, 0) for t in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
    out = cudnn_attention.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=layout.lengths,
        kv_seqlen=layout.lengths,
        q_offsets=layout.offsets,
        kv_offsets=layout.offsets,
        scale=head_dim**-0.5 if scale is None else scale,
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    return jnp.where(real, out, 0)
