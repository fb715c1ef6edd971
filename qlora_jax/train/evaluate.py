"""Evaluation: mean loss over eval batches, and exact-match accuracy of generated answers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from qlora_jax.lora import LoraConfig
from qlora_jax.models.decoder import Llama
from qlora_jax.models.generation import generate
from qlora_jax.train.step import loss_sum


def make_eval_loss(model: Llama, lora_cfg: LoraConfig, chunk_size: int):
    """jit(lora, frozen, batch) -> (summed loss, tokens); no dropout."""
    return jax.jit(
        lambda lora, frozen, batch: loss_sum(model, lora_cfg, lora, frozen, batch, None, chunk_size)
    )


def eval_loss(fn, lora: Any, frozen: Any, batches: Sequence[dict]) -> float:
    total = count = 0.0
    for batch in batches:
        t, c = fn(lora, frozen, batch)
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def _last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def answers_match(generated: str, reference: str, mode: str) -> bool:
    """exact: the first generated line equals the reference; last_number: their final numbers agree."""
    if mode == "last_number":
        return _last_number(generated) is not None and _last_number(generated) == _last_number(reference)
    first_line = generated.strip().split("\n")[0].strip()
    return first_line == reference.strip()


def exact_match(
    model: Llama,
    frozen: Any,
    lora: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    references: Sequence[str],
    mode: str,
    max_new_tokens: int,
    batch_size: int = 64,
) -> tuple[float, list[tuple[str, str]]]:
    """Accuracy of greedy answers, and (generated, reference) pairs."""
    pairs = []
    for i in range(0, len(prompts), batch_size):
        outs = generate(model, frozen, lora, list(prompts[i : i + batch_size]), max_new_tokens=max_new_tokens)
        pairs += [
            (tokenizer.decode(o, skip_special_tokens=True), r)
            for o, r in zip(outs, references[i : i + batch_size], strict=True)
        ]
    correct = np.mean([answers_match(g, r, mode) for g, r in pairs]) if pairs else 0.0
    return float(correct), pairs
