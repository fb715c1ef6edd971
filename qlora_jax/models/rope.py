"""Rotary position embeddings with HF's frequency variants: default, linear, dynamic-NTK, llama3."""

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


def inv_frequencies(cfg: LlamaConfig, positions_BxT: jax.Array) -> jax.Array:
    """float32 (head_dim/2,) inverse frequencies; dynamic-NTK depends on the longest position.

    Dynamic NTK follows HF within one forward pass: when the batch reaches past
    max_position_embeddings, the base grows with seq_len = max position in the batch + 1.
    """
    dim, s = cfg.head_dim, cfg.rope_scaling
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
    """(B, T, head_dim) cos and sin tables, computed in float32 and cast to `dtype` as HF does."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_frequencies(cfg, positions_BxT)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Rotate halves (HF layout: the first half of each head pairs with the second)."""
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
    return x_BxTxNxH * cos + rotated * sin
