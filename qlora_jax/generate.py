"""Greedy or sampled text from a model and an optional adapter (models.generation's KV cache).

python -m qlora_jax.generate --prompt "..." [--chat] [--temperature 0.7 --top_p 0.9] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from qlora_jax.models.generation import generate
from qlora_jax.sampling import SamplingConfig

__all__ = ["encode_prompt", "generate", "main"]


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
