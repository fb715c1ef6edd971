"""Text generation with a KV cache: prefill the (left-padded) prompts, then decode in one jit.

CLI: python -m qlora_jax.generate --prompt "..." [--chat] [--temperature 0.7 --top_p 0.9]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.llama import Llama
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
    batch, prompt_len = tokens_BxP.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.apply(frozen, lora, tokens_BxP, attention_mask=mask_BxP, cache=cache)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def step(state):
        i, rng, logits_BxV, cache, out_BxN, done_B = state
        rng, key = jax.random.split(rng)
        token_B = jnp.where(done_B, pad_id, next_token(logits_BxV, key, sampling))
        out_BxN = out_BxN.at[:, i].set(token_B)
        done_B = done_B | jnp.isin(token_B, eos)
        logits, cache = model.apply(frozen, lora, token_B[:, None], cache=cache)
        return i + 1, rng, logits[:, -1], cache, out_BxN, done_B

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


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of a plain prompt, or of chat messages rendered by the tokenizer's template."""
    if chat or isinstance(prompt, list):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if not tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    source.add_argument("--messages", help="JSON file with a list of {role, content} chat messages")
    parser.add_argument("--chat", action="store_true", help="wrap each --prompt in the chat template")
    parser.add_argument(
        "--adapter", default=None, help="LoRA adapter directory in PEFT format (e.g. <run>/adapter)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from qlora_jax.io.gguf import embedded_model_path
    from qlora_jax.io.hf import load_tokenizer
    from qlora_jax.models import llama

    args = parse_args(argv)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    path = args.model or embedded_model_path()
    quantization = None if args.quantization == "none" else args.quantization
    model, frozen = llama.from_pretrained(path, quantization=quantization, dtype=args.dtype)
    lora = None
    if args.adapter:
        from qlora_jax.io.peft import load_adapter

        lora, _ = load_adapter(args.adapter, frozen, model.config)
    tokenizer = load_tokenizer(path)
    if args.messages:
        with open(args.messages) as f:
            prompts = [encode_prompt(tokenizer, json.load(f), chat=True)]
    else:
        prompts = [encode_prompt(tokenizer, p, args.chat) for p in args.prompt]
    outputs = generate(
        model, frozen, lora, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed
    )
    for out in outputs:
        sys.stdout.write(tokenizer.decode(out, skip_special_tokens=True) + "\n")


if __name__ == "__main__":
    main()
