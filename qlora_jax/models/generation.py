"""Generation with a KV cache: prefill the (left-padded) prompts, then decode in one jit.

LongRoPE (Phi-3) switches to its long factors once a position passes the original length; as
transformers' Phi3ForCausalLM does, the cache is then computed again over every token so far.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.decoder import Llama
from qlora_jax.models.linear import on_device
from qlora_jax.sampling import SamplingConfig, next_token

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this, so lengths share compilations
GREEDY = SamplingConfig()


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_ids"))
def _generate_padded(
    model: Llama,
    frozen,
    lora,
    tokens_BxP,
    mask_BxP,
    rng,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
):
    frozen = on_device(frozen)  # tables kept in host memory come in once, not once per token
    batch, prompt_len = tokens_BxP.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.apply(frozen, lora, tokens_BxP, attention_mask=mask_BxP, cache=cache)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    rope = model.config.rope_scaling
    switch_at = rope.original_max_position_embeddings if rope.rope_type == "longrope" else None

    def decode(i, token_B, out_BxN, cache):
        logits, cache = model.apply(frozen, lora, token_B[:, None], cache=cache)
        return logits[:, -1], cache

    def recompute(i, token_B, out_BxN, cache):
        """Every token so far (prompt, then the generated ones up to slot i) through a fresh cache."""
        tokens = jnp.concatenate([tokens_BxP, out_BxN], axis=1)
        written = jnp.broadcast_to(jnp.arange(max_new_tokens) <= i, out_BxN.shape)
        mask = jnp.concatenate([mask_BxP, written], axis=1)
        fresh = model.init_cache(batch, prompt_len + max_new_tokens)
        hidden, cache = model.apply(
            frozen, lora, tokens, attention_mask=mask, cache=fresh, return_hidden=True
        )
        last = jax.lax.dynamic_slice_in_dim(hidden, prompt_len + i, 1, axis=1)
        return model.logits(frozen, last)[:, -1], cache._replace(index=prompt_len + i + 1)

    def step(state):
        i, rng, logits_BxV, cache, out_BxN, done_B = state
        rng, key = jax.random.split(rng)
        token_B = jnp.where(done_B, pad_id, next_token(logits_BxV, key, sampling))
        out_BxN = out_BxN.at[:, i].set(token_B)
        done_B = done_B | jnp.isin(token_B, eos)
        if switch_at is None or prompt_len + max_new_tokens <= switch_at:
            logits, cache = decode(i, token_B, out_BxN, cache)
        else:  # the longest row's new token is the first past the original length: long factors
            crossing = jnp.max(cache.next_position) == switch_at
            logits, cache = jax.lax.cond(crossing, recompute, decode, i, token_B, out_BxN, cache)
        return i + 1, rng, logits, cache, out_BxN, done_B

    def keep_going(state):
        i, *_, done_B = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (0, rng, logits[:, -1], cache, out, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(keep_going, step, state)[4]


def generate(
    model: Llama,
    frozen: Any,
    lora: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingConfig = GREEDY,
    eos_ids: Sequence[int] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """New token ids per prompt, up to and including the first EOS (HF generate's convention)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = tuple(model.config.eos_token_ids if eos_ids is None else eos_ids)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else (eos_ids or (0,))[0]
    longest = max(len(p) for p in prompts)
    limit = model.config.max_position_embeddings
    if model.config.position_embedding == "learned" and longest + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} is past the model's "
            f"{limit} learned positions (max_position_embeddings); valid: at most {limit} tokens in all"
        )
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    out = _generate_padded(
        model,
        frozen,
        lora,
        tokens,
        mask,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    results = []
    for row in np.asarray(out).tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        results.append(row[: ends[0] + 1] if ends else row)
    return results
