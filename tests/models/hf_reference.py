"""Small random transformers models (any supported family) saved as HF checkpoints: the reference
our model must match."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from qlora_jax.compare.torch_reference import hf_config
from qlora_jax.models.config import GPT2_FIELDS, LlamaConfig, RopeScaling


def small_config(**changes) -> LlamaConfig:
    """A 2-layer LLaMA small enough for CPU tests, shaped so every projection is a multiple of 64."""
    base = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
        dtype="float32",
    )
    return LlamaConfig(**(base | changes))


# Phi-3-128k's LongRoPE on the small shape: sequences up to 16 positions use the short factors,
# longer ones (generation's) the long, far enough from the short ones that greedy tokens change when
# the cache keeps the short-factor keys; the factors are float32-exact (GGUF stores float32).
PHI3_LONGROPE = RopeScaling(
    "longrope",
    factor=8.0,
    original_max_position_embeddings=16,
    short_factor=tuple(1.0 + 0.25 * i for i in range(8)),
    long_factor=tuple(4.0 * 2.0**i for i in range(8)),
    attention_factor=float(np.sqrt(1 + np.log(8.0) / np.log(16))),
)

GEMMA = dict(
    sandwich_norms=True,
    unit_offset_norms=True,
    scale_embeddings=True,
    hidden_act="gelu_pytorch_tanh",
    head_dim=64,
    query_pre_attn_scalar=48,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=4,
)
# What sets each family apart, on small_config's shape; Qwen3's head_dim (64) differs from
# hidden / heads (32) as in Qwen3's own configs, so a decoder that derived it would fail.
# Phi-3: fused projections, half of each head turned by RoPE (Phi-4-mini: 3/4), LongRoPE, and a
# sliding window the test sequences reach past.
# GPT-2 has no grouped-query attention (kv heads = heads) and ties its head, as its own configs.
FAMILIES = {
    "llama": {},
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(qk_norm=True, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6),
    "phi3": dict(
        fused_qkv=True,
        fused_gate_up=True,
        partial_rotary_factor=0.5,
        rope_scaling=PHI3_LONGROPE,
        max_position_embeddings=128,
        sliding_window=8,
    ),
    # Gemma: query_pre_attn_scalar 48 is neither head_dim (64) nor hidden / heads (32); a window of
    # 4 keys on the first layer (the second global) bites in every test sequence; the soft-caps
    # are small enough to bend the random model's scores and logits (their scale ~0.5)
    "gemma2": dict(
        GEMMA,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0,
    ),
    "gemma3": dict(
        GEMMA,
        qk_norm=True,
        rope_theta=1e6,
        rope_scaling=RopeScaling("linear", 8.0),
        rope_local_theta=1e4,
    ),
    "gpt2": dict(GPT2_FIELDS, num_kv_heads=4, hidden_act="gelu_new", tie_word_embeddings=True),
}


def family_config(family: str, **changes) -> LlamaConfig:
    """small_config with the fields of one family (FAMILIES)."""
    return small_config(**(FAMILIES[family] | changes))


def hf_model(cfg: LlamaConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A random fp32 transformers model of cfg's family (norms and biases randomized too)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith("norm.weight") or ".ln_" in name  # GPT-2's ln_1, ln_2, ln_f
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif is_norm:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def save(model: transformers.PreTrainedModel, path, max_shard_size: str | None = None) -> str:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return str(path)


def _long(a):
    return None if a is None else torch.as_tensor(np.asarray(a)).long()


def hf_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=_long(tokens), attention_mask=_long(attention_mask), position_ids=_long(position_ids)
        )
    return out.logits.float().numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the error relative to the logits' scale."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())
