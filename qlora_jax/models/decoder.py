"""Flax LLaMA-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, scanned layers.

One decoder for every family: their differences are LlamaConfig fields read here and in the
frozen tree (biases: `has_bias`; Qwen3's q/k norms: `qk_norm`; Mistral's `sliding_window`;
GPT-2's `norm_type`, `position_embedding`, `gated_mlp`, `hidden_act`, `fused_qkv`).

Weights are not Flax params: the module reads them from two variable collections passed at
apply time, `frozen` (the base model, NF4 or dense, read-only) and `lora` (adapters). Their tree
mirrors HF names: frozen["layers"]["self_attn"]["q_proj"]["weight"] holds all layers stacked on
axis 0; the model runs them with `nn.scan` (optionally unrolled) under a named remat policy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qlora_jax.models import attention
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.frozen import linear_names
from qlora_jax.models.linear import Linear, dense_weight
from qlora_jax.models.rope import apply_rope, cos_sin

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_new": functools.partial(nn.gelu, approximate=True),  # transformers' NewGELUActivation
    "gelu": functools.partial(nn.gelu, approximate=False),
}
LAYER_INPUT = "layer_input"  # checkpoint name of each layer's input (the residual stream)
ATTENTION_RESIDUALS = "attention_residuals"  # what attention's backward needs besides q, k, v
MATMUL_OPERANDS = "matmul_operands"  # normed inputs, q/k/v, gate/up and the MLP product


def _offload(*names: str) -> Any:
    """Keep only the named values for backward, in pinned host memory (copies overlap compute)."""
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(names),
        offload_src="device",
        offload_dst="pinned_host",
    )


REMAT_POLICY_FNS = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": _offload(LAYER_INPUT),
    # no attention forward in backward: its output and softmax statistics wait on the host
    "offload_attention": _offload(LAYER_INPUT, ATTENTION_RESIDUALS),
    # no forward at all in backward: every matmul operand waits on the host
    "offload_all": _offload(LAYER_INPUT, ATTENTION_RESIDUALS, MATMUL_OPERANDS),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# "auto": from this many tokens per row, recomputing attention costs more than copying its output
# to the host and back (attention work per token grows with the length, the copy does not):
# offload_attention there, offload below. Measured on H100, Llama-3-8B shape: offload_attention
# is 6% slower at 2,048 tokens and 12% faster at 65,536 (experiments/NOTES.md, issue 18).
AUTO_ATTENTION_OFFLOAD_TOKENS = 16384


def remat_policy_name(policy: str, length: int) -> str:
    """The concrete remat policy for rows of `length` tokens ("auto" resolved)."""
    if policy != "auto":
        return policy
    return "offload_attention" if length >= AUTO_ATTENTION_OFFLOAD_TOKENS else "offload"


class KVCache(NamedTuple):
    """Keys/values of every layer for decoding; slots [0, index) are written."""

    k: jax.Array  # (L, B, S, num_kv_heads, head_dim)
    v: jax.Array  # (L, B, S, num_kv_heads, head_dim)
    valid: jax.Array  # (B, S) bool: slot holds a real (non-padding) token
    index: jax.Array  # () int32: next slot to write
    next_position: jax.Array  # (B,) int32: RoPE position of the next real token


class LayerContext(NamedTuple):
    """What every layer shares: RoPE tables (None: no RoPE), the attention mask (None: causal)
    and cache slot."""

    cos: jax.Array | None
    sin: jax.Array | None
    mask: jax.Array | None
    write_index: jax.Array | None


def _window(cfg: LlamaConfig, mask: jax.Array | None) -> tuple[int, int] | None:
    """Sliding window for the mask-free causal path (explicit masks already carry the window)."""
    if mask is not None or cfg.sliding_window is None:
        return None
    return (cfg.sliding_window - 1, 0)


def attention_implementation(cfg: LlamaConfig, dtype: jnp.dtype, mask: jax.Array | None) -> str:
    """cuDNN flash attention on GPU for bf16/fp16 causal attention without an explicit mask;
    XLA otherwise (CPU, float32, padding/segment/cache masks). cfg.attention_impl overrides."""
    if cfg.attention_impl is not None:
        return cfg.attention_impl
    flash_ok = (
        jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
    )
    return "cudnn" if jax.default_backend() == "gpu" and flash_ok and mask is None else "xla"


@functools.cache
def _named_residual_attention(**static: Any) -> Any:
    """jax.nn.dot_product_attention(q, k, v, mask, **static) whose backward residuals, other than
    q, k and v themselves, carry the checkpoint name ATTENTION_RESIDUALS. A remat policy that keeps
    them (cuDNN: the output and the softmax log-sum-exp) runs no attention forward in backward; q,
    k and v stay with the projections, which are cheap to recompute."""
    attend = functools.partial(jax.nn.dot_product_attention, **static)

    @jax.custom_vjp
    def attention(q, k, v, mask):
        return attend(q, k, v, mask=mask)

    def forward(q, k, v, mask):
        raw_out, backward = jax.vjp(lambda q, k, v: attend(q, k, v, mask=mask), q, k, v)
        out = checkpoint_name(raw_out, ATTENTION_RESIDUALS)
        inputs = {id(q), id(k), id(v)}

        def named(leaf: jax.Array) -> jax.Array:
            if id(leaf) in inputs:
                return leaf
            return out if leaf is raw_out else checkpoint_name(leaf, ATTENTION_RESIDUALS)

        return out, jax.tree.map(named, backward)

    def backward(residuals, grad_out):
        return (*residuals(grad_out), None)

    attention.defvjp(forward, backward)
    return attention


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalize in float32, cast back, scale by the (frozen) weight."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.get_variable("frozen", "weight")
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * weight.astype(self.dtype)


class LayerNorm(nn.Module):
    """torch's LayerNorm (GPT-2): normalize, scale and shift in float32, cast back. A bias in the
    adapter tree (peft's bias="all" trains it) replaces the frozen one."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.get_variable("frozen", "weight")
        bias = self.get_variable("lora", "bias")
        if bias is None:
            bias = self.get_variable("frozen", "bias")
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        return (normed * weight + bias.astype(jnp.float32)).astype(self.dtype)


def norm(cfg: LlamaConfig, name: str) -> nn.Module:
    """The decoder's norm module of cfg.norm_type (RMSNorm or LayerNorm)."""
    kind = LayerNorm if cfg.norm_type == "layernorm" else RMSNorm
    return kind(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), name=name)


def split_qkv(cfg: LlamaConfig, qkv_BxTxF: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q (B, T, heads, head_dim), k and v (B, T, kv_heads, head_dim) of a fused projection whose
    features are q's, then k's, then v's."""
    batch, length, _ = qkv_BxTxF.shape
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = jnp.split(qkv_BxTxF, [q_size, q_size + kv_size], axis=-1)
    return (
        q.reshape(batch, length, cfg.num_heads, cfg.head_dim),
        k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim),
        v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim),
    )


class Attention(nn.Module):
    cfg: LlamaConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: tuple | None, ctx: LayerContext):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        batch, length, _ = x.shape
        names = linear_names(cfg)

        def linear(role: str) -> Linear:
            return Linear(dtype, self.lora_dropout, cfg.dequant_slices, name=names[role])

        if cfg.fused_qkv:
            q, k, v = split_qkv(cfg, linear("qkv")(x))
        else:
            q = linear("q")(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)
            k = linear("k")(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
            v = linear("v")(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # Qwen3: each head's q and k normalized over head_dim, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dtype, name="k_norm")(k)
        if ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = (checkpoint_name(t, MATMUL_OPERANDS) for t in (q, k, v))
        if layer_cache is not None:
            start = (0, ctx.write_index, 0, 0)
            k = jax.lax.dynamic_update_slice(layer_cache[0], k.astype(layer_cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(layer_cache[1], v.astype(layer_cache[1].dtype), start)
            layer_cache = (k, v)
        attend = _named_residual_attention(
            is_causal=ctx.mask is None,
            local_window_size=_window(cfg, ctx.mask),
            implementation=attention_implementation(cfg, q.dtype, ctx.mask),
        )
        out = attend(q, k.astype(dtype), v.astype(dtype), ctx.mask)
        out = linear("o")(out.reshape(batch, length, cfg.num_heads * cfg.head_dim))
        return out, layer_cache


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), or down(act(up(x))) without gated_mlp (GPT-2). Called
    as (carry, x) -> (carry, y) so that the same module (and its variable paths) can be scanned
    over sequence tiles (DecoderLayer)."""

    cfg: LlamaConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, carry: None, x: jax.Array) -> tuple[None, jax.Array]:
        dtype, names = jnp.dtype(self.cfg.dtype), linear_names(self.cfg)
        act = ACTIVATIONS[self.cfg.hidden_act]

        def linear(role: str) -> Linear:
            return Linear(dtype, self.lora_dropout, self.cfg.dequant_slices, name=names[role])

        if self.cfg.gated_mlp:
            gate = checkpoint_name(linear("gate")(x), MATMUL_OPERANDS)
            up = checkpoint_name(linear("up")(x), MATMUL_OPERANDS)
            product = checkpoint_name(act(gate) * up, MATMUL_OPERANDS)
        else:
            product = checkpoint_name(act(checkpoint_name(linear("up")(x), MATMUL_OPERANDS)), MATMUL_OPERANDS)
        return carry, linear("down")(product)


def _tiles(x_BxTxD: jax.Array, tile: int) -> jax.Array:
    """(B, T, D) -> (n, B, tile, D), the sequence zero-padded to a multiple of `tile`."""
    batch, length, width = x_BxTxD.shape
    n = -(-length // tile)
    x = jnp.pad(x_BxTxD, ((0, 0), (0, n * tile - length), (0, 0)))
    return x.reshape(batch, n, tile, width).swapaxes(0, 1)


def _untile(y_NxBxtxD: jax.Array, length: int) -> jax.Array:
    n, batch, tile, width = y_NxBxtxD.shape
    return y_NxBxtxD.swapaxes(0, 1).reshape(batch, n * tile, width)[:, :length]


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: tuple | None, ctx: LayerContext):
        cfg = self.cfg
        x = checkpoint_name(x, LAYER_INPUT)
        normed = checkpoint_name(norm(cfg, "input_layernorm")(x), MATMUL_OPERANDS)
        h, layer_cache = Attention(cfg, self.lora_dropout, name="self_attn")(normed, layer_cache, ctx)
        x = x + h
        normed = norm(cfg, "post_attention_layernorm")(x)
        normed = checkpoint_name(normed, MATMUL_OPERANDS)
        tile = cfg.seq_tile
        if not tile or x.shape[1] <= tile:
            return x + MLP(cfg, self.lora_dropout, name="mlp")(None, normed)[1], layer_cache
        # Sequence-tiled MLP: each tile recomputed in its own backward, so only one tile's
        # (tile, intermediate) activations are ever live; the weights are shared by every tile.
        tiled_mlp = nn.scan(
            nn.remat(MLP, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False),
            variable_broadcast=["frozen", "lora"],
            split_rngs={"dropout": True},
            length=-(-x.shape[1] // tile),
        )
        _, y = tiled_mlp(cfg, self.lora_dropout, name="mlp")(None, _tiles(normed, tile))
        return x + _untile(y, x.shape[1]), layer_cache


class Decoder(nn.Module):
    """Token ids -> final hidden states (B, T, D) in the compute dtype; layers scanned."""

    cfg: LlamaConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, ctx_mask, cache_kv, write_index):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        embed_VxD = self.get_variable("frozen", "embed_tokens")["weight"]
        x = jnp.take(embed_VxD, tokens_BxT, axis=0).astype(dtype)
        if cfg.position_embedding == "learned":  # GPT-2: a table row per position, no RoPE
            table_PxD = self.get_variable("frozen", "embed_positions")["weight"]
            x = x + jnp.take(table_PxD, positions_BxT, axis=0).astype(dtype)
            cos = sin = None
        else:
            cos, sin = cos_sin(cfg, positions_BxT, dtype)
        ctx = LayerContext(cos, sin, ctx_mask, write_index)
        layer = DecoderLayer
        policy = remat_policy_name(cfg.remat_policy, tokens_BxT.shape[1])
        if policy != "none":
            layer = nn.remat(layer, policy=REMAT_POLICY_FNS[policy], prevent_cse=False)
        layers = nn.scan(
            layer,
            variable_axes={"frozen": 0, "lora": 0},
            split_rngs={"dropout": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
        )(cfg, self.lora_dropout, name="layers")
        x, cache_kv = layers(x, cache_kv, ctx)
        return norm(cfg, "norm")(x), cache_kv


@dataclasses.dataclass(frozen=True)
class Llama:
    """A LLaMA-style model: `apply(frozen, lora, tokens) -> logits` over explicit weight trees."""

    config: LlamaConfig

    def module(self, lora_dropout: float = 0.0) -> Decoder:
        return Decoder(self.config, lora_dropout)

    def apply(
        self,
        frozen: Any,
        lora: Any,
        tokens_BxT: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        rng: jax.Array | None = None,
        lora_dropout: float = 0.0,
        return_hidden: bool = False,
    ):
        """Logits (B, T, vocab) in float32; with `cache`, returns (logits, updated cache).

        attention_mask marks real tokens (1) vs padding (0); segment_ids separate packed
        sequences (attention stays inside a segment, positions restart). `rng` turns on
        adapter dropout at rate `lora_dropout` (peft's lora_dropout). return_hidden gives the
        final normalized hidden states instead of logits (for a chunked loss).
        """
        tokens_BxT = jnp.asarray(tokens_BxT)
        length = tokens_BxT.shape[1]
        if cache is None:
            window = self.config.sliding_window
            mask = attention.self_attention_mask(attention_mask, segment_ids, length, window)
            if positions is None:
                positions = self._default_positions(tokens_BxT, attention_mask, segment_ids)
            cache_kv = write_index = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            new_valid = (
                jnp.ones(tokens_BxT.shape, bool) if attention_mask is None else attention_mask.astype(bool)
            )
            valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
            mask = attention.cache_attention_mask(valid, cache.index, length, self.config.sliding_window)
            if positions is None:
                positions = attention.padded_positions(new_valid, cache.next_position)
            cache_kv, write_index = (cache.k, cache.v), cache.index
        variables = {"frozen": frozen} | ({"lora": lora} if lora else {})
        hidden, cache_kv = self.module(lora_dropout).apply(
            variables,
            tokens_BxT,
            positions,
            mask,
            cache_kv,
            write_index,
            rngs=None if rng is None else {"dropout": rng},
        )
        out = hidden if return_hidden else self.logits(frozen, hidden)
        if cache is None:
            return out
        new_cache = KVCache(
            k=cache_kv[0],
            v=cache_kv[1],
            valid=valid,
            index=cache.index + length,
            next_position=cache.next_position + new_valid.sum(axis=1, dtype=jnp.int32),
        )
        return out, new_cache

    def logits(self, frozen: Any, hidden_BxTxD: jax.Array) -> jax.Array:
        """float32 logits from final hidden states (tied head uses the embedding)."""
        w_VxD = dense_weight(self.head_weight(frozen), hidden_BxTxD.dtype)
        return jnp.einsum("btd,vd->btv", hidden_BxTxD, w_VxD, preferred_element_type=jnp.float32)

    def head_weight(self, frozen: Any):
        """The (vocab, hidden) output projection: lm_head, or the embedding when tied."""
        if self.config.tie_word_embeddings:
            return frozen["embed_tokens"]["weight"]
        return frozen["lm_head"]["weight"]

    def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_length` tokens."""
        cfg = self.config
        shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_length), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    @staticmethod
    def _default_positions(tokens_BxT, attention_mask, segment_ids) -> jax.Array:
        if segment_ids is not None:
            return attention.segment_positions(segment_ids)
        if attention_mask is not None:
            return attention.padded_positions(attention_mask)
        return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
