"""Rotary position embeddings with HF's frequency variants: default, linear, dynamic-NTK, llama3,
longrope (Phi-3); partial rotary (Phi-3/4) turns only the first `rotary_dim` features of a head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import LlamaConfig


def _base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))


def _llama3_inv_freq(inv_freq: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    s = cfg.rope_scaling
    original = s.original_max_position_embeddings
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _longrope_inv_freq(cfg: LlamaConfig, positions_BxT: jax.Array) -> jax.Array:
    """LongRoPE: base frequencies divided by short_factor, or by long_factor once the batch's
    longest position + 1 exceeds original_max_position_embeddings (HF's per-forward choice)."""
    s, dim = cfg.rope_scaling, cfg.rotary_dim
    powers = cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    short = 1.0 / (np.asarray(s.short_factor, np.float32) * powers)
    long = 1.0 / (np.asarray(s.long_factor, np.float32) * powers)
    seq_len = jnp.max(positions_BxT) + 1
    return jnp.where(seq_len > s.original_max_position_embeddings, jnp.asarray(long), jnp.asarray(short))


def inv_frequencies(cfg: LlamaConfig, positions_BxT: jax.Array) -> jax.Array:
    """float32 (rotary_dim/2,) inverse frequencies; dynamic-NTK and longrope depend on the longest position.

    Dynamic NTK follows HF within one forward pass: when the batch reaches past
    max_position_embeddings, the base grows with seq_len = max position in the batch + 1.
    """
    dim, s = cfg.rotary_dim, cfg.rope_scaling
    if s.rope_type == "longrope":
        return _longrope_inv_freq(cfg, positions_BxT)
    inv_freq = _base_inv_freq(cfg.rope_theta, dim)
    if s.rope_type == "linear":
        inv_freq = inv_freq / np.float32(s.factor)
    elif s.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, cfg)
    if s.rope_type != "dynamic":
        return jnp.asarray(inv_freq)
    max_pos = cfg.max_position_embeddings
    seq_len = (jnp.max(positions_BxT) + 1).astype(jnp.float32)
    base = cfg.rope_theta * ((s.factor * seq_len / max_pos) - (s.factor - 1)) ** (dim / (dim - 2))
    grown = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    return jnp.where(seq_len > max_pos, grown, jnp.asarray(inv_freq))


def cos_sin(cfg: LlamaConfig, positions_BxT: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """(B, T, rotary_dim) cos and sin tables, computed in float32 (longrope: times its attention
    factor) and cast to `dtype` as HF does."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_frequencies(cfg, positions_BxT)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if cfg.rope_scaling.rope_type == "longrope":
        cos, sin = cos * cfg.rope_scaling.attention_factor, sin * cfg.rope_scaling.attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Rotate halves (HF layout: the first half of each head pairs with the second) of the first
    cos.shape[-1] features; the rest of each head passes unturned (partial rotary)."""
    rotary = cos_BxTxH.shape[-1]
    if rotary < x_BxTxNxH.shape[-1]:
        turned = apply_rope(x_BxTxNxH[..., :rotary], cos_BxTxH, sin_BxTxH)
        return jnp.concatenate([turned, x_BxTxNxH[..., rotary:]], axis=-1)
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
    return x_BxTxNxH * cos + rotated * sin
