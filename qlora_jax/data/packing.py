"""Fixed-shape training rows: pack examples with segment ids, or bucket them by length.

A row holds `inputs` (token t), `targets` (token t+1), `loss_mask` (target counts), `segment_ids`
(0 = padding, 1.. = example within the row) and `positions` (restarting per example), all of
length seq_len, so a run compiles once per shape instead of once per batch. A stacked batch adds
`segment_starts`: per row, where each example starts, then where the last ends, -1 after (the
`cu_seqlens` of varlen flash attention, in a fixed number of slots: the model runs cuDNN's packed
attention from it instead of a (T, T) mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from qlora_jax.data.formats import Example

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# examples per packed row: the slots of segment_starts (cuDNN's packed attention costs more with
# more slots; 32 holds rows of examples down to 1/32 of the row length, as MaxText's default)
DEFAULT_MAX_SEGMENTS = 32


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


def pack(
    examples: Iterable[Example],
    seq_len: int,
    stats: TruncationStats | None = None,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
) -> list[dict]:
    """Greedy packing in order: examples fill a row until the next does not fit or the row holds
    max_segments examples (the slots of `segment_starts`)."""
    stats = stats if stats is not None else TruncationStats()
    rows: list[dict[str, np.ndarray]] = []
    row, used, segment = empty_row(seq_len), 0, 0
    for example in examples:
        parts = _shifted(example, seq_len, stats)
        if parts is None:
            continue
        n = len(parts[0])
        if used + n > seq_len or segment == max_segments:
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


def segment_starts(segment_ids_BxT: np.ndarray, max_segments: int) -> np.ndarray:
    """(B, max_segments + 1) int32: per row, the first index of examples 1, 2, ... then the end of
    the last, -1 in the slots after. Examples are contiguous from index 0, padding after them."""
    out = np.full((len(segment_ids_BxT), max_segments + 1), -1, np.int32)
    for b, ids in enumerate(segment_ids_BxT):
        count = int(ids.max(initial=0))
        if count > max_segments:
            raise ValueError(f"a row holds {count} examples, more than max_segments={max_segments}")
        if count:
            out[b, :count] = np.searchsorted(ids[ids > 0], np.arange(1, count + 1))
            out[b, count] = np.count_nonzero(ids)
    return out


def stack(rows: Sequence[dict], max_segments: int = DEFAULT_MAX_SEGMENTS) -> dict[str, np.ndarray]:
    """Rows as one batch, with their segment_starts (max_segments slots)."""
    batch = {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
    batch["segment_starts"] = segment_starts(batch["segment_ids"], max_segments)
    return batch
