"""Attention masks (causal, padding, packed segments, KV cache), positions derived from them,
cuDNN's flash attention over packed rows, and Gemma's tanh soft-capping (of attention scores and
of logits)."""

from __future__ import annotations

import functools
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


# cuDNN's packed backward sizes its float32 workspace as if every (row, slot) pair held a whole
# row: rows x slots x heads x length x (8 x head_dim + 4) bytes, 2 GiB for Llama-3-8B's heads at
# 1 x 2048 with 32 slots (XLA's buffer assignment, call issue18-h200-cc80ebc), against 64 MiB for
# the unpacked row. So each row goes to the kernel on its own, this many slots a call: a call's
# workspace is that of 8 unpacked rows, whatever the batch and the slot count.
PACKED_SLOTS_PER_CALL = 8


def _call_layouts(layout: PackedLayout, per_call: int) -> list[PackedLayout]:
    """The layout split into calls of `per_call` slots each (the last padded with unused slots,
    so every call has one shape and one cuDNN plan)."""
    rows, slots = layout.lengths.shape
    calls = []
    for start in range(0, slots, per_call):
        stop = min(start + per_call, slots)
        unused = jnp.full((rows, start + per_call - stop + 1), -1, layout.lengths.dtype)
        offsets = jnp.concatenate([layout.offsets[:, start:stop], unused], axis=1)
        lengths = jnp.concatenate([layout.lengths[:, start:stop], unused[:, 1:]], axis=1)
        calls.append(PackedLayout(offsets, lengths))
    return calls


def _call_of_token(layout: PackedLayout, length: int, per_call: int) -> jax.Array:
    """(B, T): 1 + the index of the call whose slots hold each token's sequence; 0 for padding."""
    t = jnp.arange(length)
    starts = layout.offsets[:, :-1, None]
    inside = (t >= starts) & (t < starts + layout.lengths[:, :, None])  # (B, M, T)
    return jnp.where(inside.any(axis=1), jnp.argmax(inside, axis=1) // per_call + 1, 0)


def _packed_kernel(q, k, v, layout: PackedLayout, scale: float) -> jax.Array:
    """One call of cuDNN's packed kernel on the sequences in `layout`'s slots."""
    return cudnn_attention.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=layout.lengths,
        kv_seqlen=layout.lengths,
        q_offsets=layout.offsets,
        kv_offsets=layout.offsets,
        scale=scale,
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )


def _taken_per_token(call_of_token: jax.Array, per_call_values: list[jax.Array]) -> jax.Array:
    """Each token's value from the call that holds its sequence (a call leaves the others
    unwritten), zero for padding."""
    like = per_call_values[0]
    which = jnp.broadcast_to(call_of_token[:, :, None, None], like.shape)
    return jax.lax.select_n(which, jnp.zeros_like(like), *per_call_values)


def _rows(*arrays):
    """Each row of the arrays (leading axis), its axis kept."""
    return [[x[row : row + 1] for x in arrays] for row in range(arrays[0].shape[0])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _packed_row_by_row(q, k, v, layout, call_of_token, per_call: int, scale: float) -> jax.Array:
    """Packed attention a row and `per_call` slots a kernel call (`packed_flash_attention`)."""
    return _packed_row_by_row_forward(q, k, v, layout, call_of_token, per_call, scale)[0]


def _packed_row_by_row_forward(q, k, v, layout, call_of_token, per_call, scale):
    """Row by row (the barrier orders them, so one row's calls are live at a time)."""
    outs, previous = [], ()
    for q_r, k_r, v_r, offsets, lengths, calls_r in _rows(q, k, v, *layout, call_of_token):
        q_r, k_r, v_r, previous = jax.lax.optimization_barrier((q_r, k_r, v_r, previous))
        calls = _call_layouts(PackedLayout(offsets, lengths), per_call)
        previous = _taken_per_token(calls_r, [_packed_kernel(q_r, k_r, v_r, c, scale) for c in calls])
        outs.append(previous)
    return jnp.concatenate(outs), (q, k, v, layout, call_of_token)


def _packed_row_by_row_backward(per_call, scale, residuals, d_out):
    """Each call's forward runs again here, so no call's output is kept between the passes."""
    q, k, v, layout, call_of_token = residuals
    grads, previous = [], ()
    for q_r, k_r, v_r, d_r, offsets, lengths, calls_r in _rows(q, k, v, d_out, *layout, call_of_token):
        q_r, k_r, v_r, d_r, previous = jax.lax.optimization_barrier((q_r, k_r, v_r, d_r, previous))
        per_call_grads = []
        for call in _call_layouts(PackedLayout(offsets, lengths), per_call):
            _, pullback = jax.vjp(lambda q, k, v, c=call: _packed_kernel(q, k, v, c, scale), q_r, k_r, v_r)
            per_call_grads.append(pullback(d_r))
        previous = tuple(_taken_per_token(calls_r, list(g)) for g in zip(*per_call_grads, strict=True))
        grads.append(previous)
    return (*(jnp.concatenate(g) for g in zip(*grads, strict=True)), None, None)


_packed_row_by_row.defvjp(_packed_row_by_row_forward, _packed_row_by_row_backward)


def packed_flash_attention(
    q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, layout: PackedLayout, scale=None
) -> jax.Array:
    """Causal attention inside each packed sequence on cuDNN's flash kernel (grouped-query heads
    as is), a row and PACKED_SLOTS_PER_CALL slots a call. Padding tokens, in no sequence, get
    zero output and no gradient."""
    length, head_dim = q_BxTxNxH.shape[1], q_BxTxNxH.shape[-1]
    per_call = min(PACKED_SLOTS_PER_CALL, max(layout.lengths.shape[1], 2))  # 1 slot: read as unpacked
    call_of_token = _call_of_token(layout, length, per_call)
    scale = head_dim**-0.5 if scale is None else scale
    return _packed_row_by_row(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, layout, call_of_token, per_call, scale)
