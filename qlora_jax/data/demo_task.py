"""The built-in demo task: two-number addition questions, generated (no download).

SmolLM2-135M-Instruct gets these mostly wrong ("What is 17 + 25?" -> 32); a few minutes of QLoRA
on two CPU cores fix it. Train and eval questions never share a pair of numbers.
"""

from __future__ import annotations

import random
from typing import Any

PROMPT = "Question: What is {a} + {b}?\nAnswer:"
EVAL_EXAMPLES = 200


def _pairs(low: int, high: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]


def builtin_rows(name: str, split: str, seed: int) -> list[dict[str, Any]]:
    """Rows {"prompt", "completion"} of a built-in task: "addition" or "addition:N" (train size)."""
    task, _, size = name.partition(":")
    if task != "addition":
        raise ValueError(f"unknown built-in task {task!r}; valid: 'addition'")
    pairs = _pairs(10, 99)
    random.Random(1234).shuffle(pairs)  # fixed split, independent of the run's seed
    held_out, train = pairs[:EVAL_EXAMPLES], pairs[EVAL_EXAMPLES:]
    if split == "train":
        chosen = train[: int(size)] if size else train
        random.Random(seed).shuffle(chosen)
    elif split in ("eval", "test", "validation"):
        chosen = held_out
    else:
        raise ValueError(f"split {split!r} unknown for built-in tasks; valid: train, eval")
    return [{"prompt": PROMPT.format(a=a, b=b), "completion": f" {a + b}"} for a, b in chosen]
