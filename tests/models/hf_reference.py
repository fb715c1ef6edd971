"""Small random transformers models (any supported family) saved as HF checkpoints: the reference
our model must match."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from qlora_jax.compare.torch_reference import hf_config
from qlora_jax.models.config import GPT2_FIELDS, LlamaConfig


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


# What sets each family apart, on small_config's shape; Qwen3's head_dim (64) differs from
# hidden / heads (32) as in Qwen3's own configs, so a decoder that derived it would fail.
# GPT-2 has no grouped-query attention (kv heads = heads) and ties its head, as its own configs.
FAMILIES = {
    "llama": {},
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(qk_norm=True, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6),
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
