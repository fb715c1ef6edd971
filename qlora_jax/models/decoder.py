"""Flax LLaMA-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, scanned layers.

One decoder for every family: their differences are LlamaConfig fields read here and in the
frozen tree (biases: `has_bias`; Qwen3's q/k norms: `qk_norm`; Mistral's `sliding_window`; fused
projections, split here after one matmul each: `fused_qkv` (Phi-3's qkv_proj, GPT-2's c_attn) and
`fused_gate_up` (Phi-3); Gemma's `sandwich_norms`, `unit_offset_norms`, `scale_embeddings`, soft-caps,
and per-layer windows and RoPE bases: `layer_types`, `rope_local_theta`, scanned as a per-layer flag;
GPT-2's `norm_type`, `position_embedding`, `gated_mlp`; the MLP's `hidden_act`).

Weights are not Flax params: the module reads them from two variable collections passed at
apply time, `frozen` (the base model, NF4 or dense, read-only) and `lora` (adapters). Their tree
mirrors HF names: frozen["layers"]["self_attn"]["q_proj"]["weight"] holds all layers stacked on
axis 0; the model runs them with `nn.scan`, or one after another (scan_layers=False), under a
named remat policy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qlora_jax.models import attention
from qlora_jax.models.attention import packed_flash_attention, softcapped_attention
from qlora_jax.models.config import LlamaConfig, RopeScaling
from qlora_jax.models.frozen import linear_names
from qlora_jax.models.linear import Linear, dense_weight, laid_out
from qlora_jax.models.rope import apply_rope, cos_sin

# the MLP's activation by LlamaConfig.hidden_act (config.HIDDEN_ACTS), as transformers' ACT2FN
ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),  # Gemma's GeGLU
    "gelu_new": functools.partial(nn.gelu, approximate=True),  # GPT-2: NewGELUActivation, the same tanh form
    "gelu": functools.partial(nn.gelu, approximate=False),
}
LAYER_INPUT = "layer_input"  # checkpoint name of each layer's input (the residual stream)
ATTENTION_RESIDUALS = "attention_residuals"  # what attention's backward needs besides q, k, v
MATMUL_OPERANDS = "matmul_operands"  # normed inputs, q/k/v, gate/up and the MLP product


def _offload(*names: str) -> Any:
    """Keep only the named values for backward, in pinned host memory (XLA schedules the copies;
    whether they overlap compute is its choice: experiments/NOTES.md, issue 18)."""
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
# cuDNN's fused attention refuses some sequence lengths when differentiated (odd ones, JAX 0.11:
# "Unsupported sequence length"); the flash path pads q, k, v to a multiple of this at the end
CUDNN_LENGTH_MULTIPLE = 64


# XLA's GPU client keeps offloaded buffers in a pinned host pool of this many GB unless the
# environment variable names another size (the training CLI sizes it to the machine: cli.py)
HOST_POOL_VARIABLE, HOST_POOL_DEFAULT_GB = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", 64
HOST_POOL_FOR_ACTIVATIONS = 0.9  # the rest: the offloaded optimizer state and tables


def host_pool_bytes() -> float:
    """The pinned host pool XLA's GPU client may fill with offloaded buffers, in bytes."""
    return float(os.environ.get(HOST_POOL_VARIABLE, HOST_POOL_DEFAULT_GB)) * 1e9


def remat_policy_name(policy: str, cfg: LlamaConfig, batch: int, length: int) -> str:
    """The concrete remat policy for `batch` rows of `length` tokens ("auto" resolved): offload
    below AUTO_ATTENTION_OFFLOAD_TOKENS; from there offload_attention where its host copies (each
    layer's input, attention output and softmax statistics, for every local device's rows) fit
    the host pool, else offload (Llama-3-8B: 64 GiB at 131,072 tokens, 128 GiB at 262,144)."""
    if policy != "auto":
        return policy
    if length < AUTO_ATTENTION_OFFLOAD_TOKENS:
        return "offload"
    width = jnp.dtype(cfg.dtype).itemsize
    per_token = cfg.hidden_size * width + cfg.num_heads * (cfg.head_dim * width + 4)
    need = per_token * cfg.num_layers * batch * length * jax.local_device_count()
    return "offload_attention" if need <= HOST_POOL_FOR_ACTIVATIONS * host_pool_bytes() else "offload"


class KVCache(NamedTuple):
    """Keys/values of every layer for decoding; slots [0, index) are written."""

    k: jax.Array  # (L, B, S, num_kv_heads, head_dim)
    v: jax.Array  # (L, B, S, num_kv_heads, head_dim)
    valid: jax.Array  # (B, S) bool: slot holds a real (non-padding) token
    index: jax.Array  # () int32: next slot to write
    next_position: jax.Array  # (B,) int32: RoPE position of the next real token


class LayerContext(NamedTuple):
    """What every layer shares: RoPE tables (None: no RoPE), the attention mask (None: causal, or
    packed rows' layout where `packed` is set) and cache slot; with per-layer windows (layer_types)
    also the sliding layers' tables and mask (None: the same)."""

    cos: jax.Array | None
    sin: jax.Array | None
    mask: jax.Array | None
    write_index: jax.Array | None
    sliding_cos: jax.Array | None = None
    sliding_sin: jax.Array | None = None
    sliding_mask: jax.Array | None = None
    packed: attention.PackedLayout | None = None  # cuDNN's packed attention instead of a mask


def _for_layer(ctx: LayerContext, is_sliding: jax.Array | None) -> LayerContext:
    """The context of one layer: the sliding layers' RoPE tables and mask where is_sliding is set
    (a scanned per-layer flag, so one compiled layer serves both kinds)."""
    if is_sliding is None:
        return ctx

    def pick(sliding: jax.Array | None, full: jax.Array | None) -> jax.Array | None:
        return full if sliding is None else jnp.where(is_sliding, sliding, full)

    return ctx._replace(
        cos=pick(ctx.sliding_cos, ctx.cos),
        sin=pick(ctx.sliding_sin, ctx.sin),
        mask=pick(ctx.sliding_mask, ctx.mask),
    )


def _window(cfg: LlamaConfig, mask: jax.Array | None) -> tuple[int, int] | None:
    """Sliding window for the mask-free causal path (explicit masks already carry the window)."""
    if mask is not None or cfg.uniform_window is None:
        return None
    return (cfg.uniform_window - 1, 0)


def attention_implementation(cfg: LlamaConfig, dtype: jnp.dtype, mask: jax.Array | None) -> str:
    """cuDNN flash attention on GPU for bf16/fp16 causal attention without an explicit mask;
    XLA otherwise (CPU, float32, padding/segment/cache masks). cfg.attention_impl overrides."""
    if cfg.attention_impl is not None:
        return cfg.attention_impl
    flash_ok = (
        jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and cfg.head_dim <= 128
        and cfg.head_dim % 8 == 0
        and cfg.attn_logit_softcapping is None
    )
    return "cudnn" if jax.default_backend() == "gpu" and flash_ok and mask is None else "xla"


def packed_attention_layout(
    cfg: LlamaConfig,
    attention_mask: jax.Array | None,
    segment_ids: jax.Array | None,
    segment_starts: jax.Array | None,
) -> attention.PackedLayout | None:
    """The packed rows' layout where cuDNN's flash attention can run them (the flash path's
    conditions, one window for every layer, no padding mask besides the segments); else None and
    the rows get an explicit (T, T) segment mask on XLA."""
    if segment_starts is None or segment_ids is None or attention_mask is not None:
        return None
    if cfg.layer_types is not None or cfg.uniform_window is not None:
        return None
    if attention_implementation(cfg, jnp.dtype(cfg.dtype), None) != "cudnn":
        return None
    return attention.packed_layout(segment_starts)


def causal_padded(attend: Any, multiple: int) -> Any:
    """Mask-free causal `attend(q, k, v, mask=None)` run on q, k and v padded at the end to a
    multiple of `multiple` tokens, the padding cut from the output. Exact: no real query attends
    to a later key, so the padded keys are never seen, and the padded queries' outputs (and so
    their gradients) are dropped."""

    def padded(q, k, v, mask=None):  # mask: also a packed layout, which padding leaves as it is
        length = q.shape[1]
        widths = ((0, 0), (0, -length % multiple), (0, 0), (0, 0))
        if not any(widths[1]):
            return attend(q, k, v, mask=mask)
        return attend(*(jnp.pad(x, widths) for x in (q, k, v)), mask=mask)[:, :length]

    return padded


@functools.cache
def _named_residual_attention(**static: Any) -> Any:
    """jax.nn.dot_product_attention(q, k, v, mask, **static) whose backward residuals, other than
    q, k and v themselves, carry the checkpoint name ATTENTION_RESIDUALS. A remat policy that keeps
    them (cuDNN: the output and the softmax log-sum-exp) runs no attention forward in backward; q,
    k and v stay with the projections, which are cheap to recompute. A `softcap` runs
    softcapped_attention (Gemma 2) instead."""
    softcap = static.pop("softcap", None)
    if static.get("implementation") == "cudnn_packed":  # `mask` is then the packed layout
        scale = static.get("scale")
        attend = causal_padded(
            lambda q, k, v, mask: packed_flash_attention(q, k, v, mask, scale),
            CUDNN_LENGTH_MULTIPLE,
        )
    elif softcap is None:
        attend = functools.partial(jax.nn.dot_product_attention, **static)
    else:
        attend = functools.partial(softcapped_attention, softcap=softcap, **static)
    if static.get("implementation") == "cudnn" and static.get("is_causal"):
        attend = causal_padded(attend, CUDNN_LENGTH_MULTIPLE)

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
    """HF LlamaRMSNorm: normalize in float32, cast back, scale by the (frozen) weight. With
    unit_offset, Gemma's: scale by (1 + weight) in float32, then cast."""

    eps: float
    dtype: Any
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.get_variable("frozen", "weight")
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
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
    """The family's norm named as its frozen weight: LayerNorm (GPT-2), or RMSNorm with Gemma's
    unit offset or without."""
    if cfg.norm_type == "layernorm":
        return LayerNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), name=name)
    return RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), cfg.unit_offset_norms, name=name)


def split_qkv(cfg: LlamaConfig, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fused projection's (..., features) output cut into q, k and v, in that order (Phi-3's
    qkv_proj, GPT-2's c_attn): num_heads * head_dim features, then num_kv_heads * head_dim twice."""
    q_end = cfg.num_heads * cfg.head_dim
    k_end = q_end + cfg.num_kv_heads * cfg.head_dim
    return qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]


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
            q, k, v = linear("q")(x), linear("k")(x), linear("v")(x)
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # Qwen3, Gemma 3: each head's q and k normalized over head_dim, before RoPE
            q = norm(cfg, "q_norm")(q)
            k = norm(cfg, "k_norm")(k)
        if ctx.cos is not None:  # no RoPE with learned positions (GPT-2)
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = (checkpoint_name(t, MATMUL_OPERANDS) for t in (q, k, v))
        if layer_cache is not None:
            start = (0, ctx.write_index, 0, 0)
            k = jax.lax.dynamic_update_slice(layer_cache[0], k.astype(layer_cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(layer_cache[1], v.astype(layer_cache[1].dtype), start)
            layer_cache = (k, v)
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        if ctx.packed is not None:
            attend = _named_residual_attention(implementation="cudnn_packed", scale=scale)
        else:
            attend = _named_residual_attention(
                is_causal=ctx.mask is None,
                local_window_size=_window(cfg, ctx.mask),
                implementation=attention_implementation(cfg, q.dtype, ctx.mask),
                scale=scale,
                softcap=cfg.attn_logit_softcapping,
            )
        out = attend(q, k.astype(dtype), v.astype(dtype), ctx.mask if ctx.packed is None else ctx.packed)
        out = linear("o")(out.reshape(batch, length, cfg.num_heads * cfg.head_dim))
        return out, layer_cache


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), the activation from ACTIVATIONS by hidden_act (silu;
    Gemma's GeGLU: gelu_pytorch_tanh); with fused_gate_up one gate_up_proj whose output halves are
    gate, then up (Phi-3); without gated_mlp down(act(up(x))) (GPT-2's c_fc, c_proj). Called as
    (carry, x) -> (carry, y) so that the same module (and its variable paths) can be scanned over
    sequence tiles (DecoderLayer)."""

    cfg: LlamaConfig
    lora_dropout: float = 0.0
    # False over sequence tiles: each tile is recomputed in its own backward, so its operands are
    # not offered to the remat policy (offload_all kept every tile's, and XLA:GPU failed to compile
    # those host copies inside the nested scan: call issue18-x2a-730b0a3)
    operands_kept: bool = True

    @nn.compact
    def __call__(self, carry: None, x: jax.Array) -> tuple[None, jax.Array]:
        dtype, names = jnp.dtype(self.cfg.dtype), linear_names(self.cfg)
        act = ACTIVATIONS[self.cfg.hidden_act]

        def linear(role: str) -> Linear:
            return Linear(dtype, self.lora_dropout, self.cfg.dequant_slices, name=names[role])

        def operand(value: jax.Array) -> jax.Array:
            return checkpoint_name(value, MATMUL_OPERANDS) if self.operands_kept else value

        if not self.cfg.gated_mlp:
            up = operand(linear("up")(x))
            return carry, linear("down")(operand(act(up)))
        if self.cfg.fused_gate_up:
            gate, up = jnp.split(linear("gate_up")(x), 2, axis=-1)
        else:
            gate, up = linear("gate")(x), linear("up")(x)
        gate, up = operand(gate), operand(up)
        return carry, linear("down")(operand(act(gate) * up))


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
    """Pre-norm attention and MLP blocks; with sandwich_norms (Gemma) each block's output is
    normed too, and the MLP's input norm is pre_feedforward_layernorm."""

    cfg: LlamaConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, layer_cache: tuple | None, ctx: LayerContext, is_sliding: jax.Array | None
    ):
        cfg = self.cfg
        ctx = _for_layer(ctx, is_sliding)
        x = checkpoint_name(x, LAYER_INPUT)
        normed = checkpoint_name(norm(cfg, "input_layernorm")(x), MATMUL_OPERANDS)
        h, layer_cache = Attention(cfg, self.lora_dropout, name="self_attn")(normed, layer_cache, ctx)
        if cfg.sandwich_norms:
            h = norm(cfg, "post_attention_layernorm")(h)
        x = x + h
        mlp_norm = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
        normed = checkpoint_name(norm(cfg, mlp_norm)(x), MATMUL_OPERANDS)
        tile = cfg.seq_tile
        if not tile or x.shape[1] <= tile:
            y = MLP(cfg, self.lora_dropout, name="mlp")(None, normed)[1]
        else:
            # Sequence-tiled MLP: each tile recomputed in its own backward, so only one tile's
            # (tile, intermediate) activations are ever live; the weights are shared by every tile.
            tiled_mlp = nn.scan(
                nn.remat(MLP, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False),
                variable_broadcast=["frozen", "lora"],
                split_rngs={"dropout": True},
                length=-(-x.shape[1] // tile),
            )
            mlp = tiled_mlp(cfg, self.lora_dropout, operands_kept=False, name="mlp")
            _, y = mlp(None, _tiles(normed, tile))
            y = _untile(y, x.shape[1])
        if cfg.sandwich_norms:
            y = norm(cfg, "post_feedforward_layernorm")(y)
        return x + y, layer_cache


class Decoder(nn.Module):
    """Token ids -> final hidden states (B, T, D) in the compute dtype; layers scanned."""

    cfg: LlamaConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(
        self,
        tokens_BxT,
        positions_BxT,
        ctx_mask,
        cache_kv,
        write_index,
        sliding_mask=None,
        packed=None,
        embeddings_BxTxD=None,
    ):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if embeddings_BxTxD is not None:  # the tokens' rows, looked up by the caller
            x = embeddings_BxTxD
        else:
            # the whole table on each device under fsdp, as the weights are (each device looks up
            # its own rows' tokens), not the global batch's embeddings summed over the vocabulary's shards
            x = jnp.take(laid_out(self.get_variable("frozen", "embed_tokens")["weight"]), tokens_BxT, axis=0)
        if cfg.scale_embeddings:  # Gemma: sqrt(hidden) as float32, rounded to the table's dtype (as HF)
            x = x * jnp.asarray(np.float32(cfg.hidden_size**0.5)).astype(x.dtype)
        x = x.astype(dtype)
        if cfg.position_embedding == "learned":  # GPT-2: a table row per position, no RoPE
            table_PxD = laid_out(self.get_variable("frozen", "embed_positions")["weight"])
            x = x + jnp.take(table_PxD, positions_BxT, axis=0).astype(dtype)
            cos = sin = None
        else:
            cos, sin = cos_sin(cfg, positions_BxT, dtype)
        ctx = LayerContext(cos, sin, ctx_mask, write_index, sliding_mask=sliding_mask, packed=packed)
        is_sliding = None
        if cfg.layer_types is not None:
            is_sliding = jnp.asarray([kind == "sliding_attention" for kind in cfg.layer_types])
        if cfg.rope_local_theta is not None:  # Gemma 3: the sliding layers' own RoPE base, unscaled
            local = cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=RopeScaling())
            sliding_cos, sliding_sin = cos_sin(local, positions_BxT, dtype)
            ctx = ctx._replace(sliding_cos=sliding_cos, sliding_sin=sliding_sin)
        policy = remat_policy_name(cfg.remat_policy, cfg, *tokens_BxT.shape)
        if cfg.scan_layers:
            layer = DecoderLayer
            if policy != "none":
                layer = nn.remat(layer, policy=REMAT_POLICY_FNS[policy], prevent_cse=False)
            layers = nn.scan(
                layer,
                variable_axes={"frozen": 0, "lora": 0},
                split_rngs={"dropout": True},
                in_axes=(0, nn.broadcast, 0),
                length=cfg.num_layers,
            )(cfg, self.lora_dropout, name="layers")
            x, cache_kv = layers(x, cache_kv, ctx, is_sliding)
        else:
            x, cache_kv = self._layer_by_layer(policy, x, cache_kv, ctx, is_sliding)
        return norm(cfg, "norm")(x), cache_kv

    def _layer_by_layer(self, policy: str, x, cache_kv, ctx: LayerContext, is_sliding):
        """The layers one after another (model.scan_layers=False), each under its own remat: with
        no loop, what a layer keeps for backward is an array of its own (an offloaded layer input
        is a plain copy to host memory, not a slice of a stacked host buffer), at the cost of
        compiling every layer. Each layer's weights are sliced from the stacked ones inside its
        remat, so backward slices them again rather than keeping the slices."""
        layer = DecoderLayer(self.cfg, self.lora_dropout)

        def run(stacked, i, x, layer_cache, ctx, sliding, rngs):
            variables = jax.tree.map(lambda leaf: leaf[i], stacked)
            return layer.apply(variables, x, layer_cache, ctx, sliding, rngs=rngs)

        if policy != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICY_FNS[policy], static_argnums=(1,))
        stacked = {kind: tree["layers"] for kind, tree in self.variables.items() if "layers" in tree}
        updated = []
        for i in range(self.cfg.num_layers):
            layer_cache = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
            rngs = {"dropout": self.make_rng("dropout")} if self.has_rng("dropout") else None
            sliding = None if is_sliding is None else is_sliding[i]
            x, layer_cache = run(stacked, i, x, layer_cache, ctx, sliding, rngs)
            updated.append(layer_cache)
        if cache_kv is not None:
            cache_kv = tuple(jnp.stack(parts) for parts in zip(*updated, strict=True))
        return x, cache_kv


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
        segment_starts: jax.Array | None = None,
        cache: KVCache | None = None,
        rng: jax.Array | None = None,
        lora_dropout: float = 0.0,
        return_hidden: bool = False,
        embeddings: jax.Array | None = None,
    ):
        """Logits (B, T, vocab) in float32; with `cache`, returns (logits, updated cache).

        attention_mask marks real tokens (1) vs padding (0); segment_ids separate packed
        sequences (attention stays inside a segment, positions restart); with segment_starts
        too (the data pipeline's, data/packing.py) they run on cuDNN's packed flash attention
        where the GPU path allows, instead of a (T, T) mask. `rng` turns on
        adapter dropout at rate `lora_dropout` (peft's lora_dropout). return_hidden gives the
        final normalized hidden states instead of logits (for a chunked loss). `embeddings`
        (B, T, D): the tokens' rows of the embedding table, looked up by the caller (the training
        loop does so on the host when the table is in host memory); None: looked up here.
        """
        cfg = self.config
        tokens_BxT = jnp.asarray(tokens_BxT)
        length = tokens_BxT.shape[1]
        per_layer = cfg.layer_types is not None  # per-layer windows: explicit masks of both kinds
        sliding_mask = packed = None
        if cache is None:
            if per_layer and attention_mask is None and segment_ids is None:
                attention_mask = jnp.ones(tokens_BxT.shape, bool)
            packed = packed_attention_layout(cfg, attention_mask, segment_ids, segment_starts)
            mask = None
            if packed is None:
                mask = attention.self_attention_mask(attention_mask, segment_ids, length, cfg.uniform_window)
            if per_layer:
                sliding_mask = attention.self_attention_mask(
                    attention_mask, segment_ids, length, cfg.sliding_window
                )
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
            mask = attention.cache_attention_mask(valid, cache.index, length, cfg.uniform_window)
            if per_layer:
                sliding_mask = attention.cache_attention_mask(valid, cache.index, length, cfg.sliding_window)
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
            sliding_mask,
            packed,
            embeddings,
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
        """float32 logits from final hidden states (tied head uses the embedding), soft-capped
        when the family caps them (Gemma 2's final_logit_softcapping)."""
        logits = jnp.einsum(
            "btd,vd->btv", hidden_BxTxD, self.head(frozen, hidden_BxTxD), preferred_element_type=jnp.float32
        )
        return attention.soft_cap(logits, self.config.final_logit_softcapping)

    def head(self, frozen: Any, hidden_BxTxD: jax.Array) -> jax.Array:
        """The (vocab, hidden) head in the hidden states' dtype, as the matmul wants it. Its copy
        from host memory (`frozen.tables_in_host_memory`) waits for the hidden states (the barrier), so
        the head is not on the device while the layers' activations are."""
        _, weight = jax.lax.optimization_barrier((hidden_BxTxD, self.head_weight(frozen)))
        return dense_weight(laid_out(weight), hidden_BxTxD.dtype)

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
