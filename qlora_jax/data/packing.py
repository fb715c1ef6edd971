"""Fixed-shape training rows: pack examples with segment ids, or bucket them by length.

A row holds `inputs` (token t), `targets` (token t+1), `loss_mask` (target counts), `segment_ids`
(0 = padding, 1.. = example within the row) and `positions` (restarting per example), all of
length seq_len, so a run compiles once per shape instead of once per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from qlora_jax.data.formats import Example

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class TruncationStats:
    examples: int = 0
    truncated_examples: int = 0
    tokens_cut: int = 0
    dropped_examples: int = 0  # truncated to nothing in the loss (the prompt fills max_seq_len)

    def describe(self) -> str:
        return (
            f"{self.truncated_examples} of {self.examples} examples truncated ({self.tokens_cut} tokens "
            f"cut), {self.dropped_examples} dropped with no loss token left"
        )


def _shifted(example: Example, max_tokens: int, stats: TruncationStats) -> tuple[np.ndarray, ...] | None:
    """(inputs, targets, loss_mask) of one example cut to max_tokens predictions; None when nothing is
    left to learn from (too short, or truncation cut every loss token)."""
    stats.examples += 1
    n = len(example.ids) - 1  # predictions in the example
    if n < 1:
        return None
    if n > max_tokens:
        stats.truncated_examples += 1
        stats.tokens_cut += n - max_tokens
        n = max_tokens
    ids = np.asarray(example.ids[: n + 1], np.int32)
    mask = np.asarray(example.loss_mask[1 : n + 1], bool)
    if n < len(example.ids) - 1 and not mask.any():
        stats.dropped_examples += 1
        return None
    return ids[:-1], ids[1:], mask


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(seq_len, bool if k == "loss_mask" else np.int32) for k in ROW_KEYS}


def pack(examples: Iterable[Example], seq_len: int, stats: TruncationStats | None = None) -> list[dict]:
    """Greedy packing in order: examples fill a row until the next does not fit."""
    stats = stats if stats is not None else TruncationStats()
    rows: list[dict[str, np.ndarray]] = []
    row, used, segment = empty_row(seq_len), 0, 0
    for example in examples:
        parts = _shifted(example, seq_len, stats)
        if parts is None:
            continue
        n = len(parts[0])
        if used + n > seq_len:
            rows.append(row)
            row, used, segment = empty_row(seq_len), 0, 0
        segment += 1
        span = slice(used, used + n)
        row["inputs"][span], row["targets"][span], row["loss_mask"][span] = parts
        row["segment_ids"][span] = segment
        row["positions"][span] = np.arange(n)
        used += n
    if used:
        rows.append(row)
    return rows


def bucket(
    examples: Iterable[Example], buckets: Sequence[int], stats: TruncationStats | None = None
) -> dict[int, list[dict]]:
    """One example per row, padded to the smallest bucket length that holds it."""
    stats = stats if stats is not None else TruncationStats()
    buckets = sorted(buckets)
    out: dict[int, list[dict]] = {b: [] for b in buckets}
    for example in examples:
        parts = _shifted(example, buckets[-1], stats)
        if parts is None:
            continue
        n = len(parts[0])
        size = next(b for b in buckets if b >= n)
        row = empty_row(size)
        row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = parts
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n)
        out[size].append(row)
    return out


def stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
