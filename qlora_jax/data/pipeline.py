"""From a data source to an endless, resumable stream of fixed-shape batches.

Examples are tokenized once. Each epoch shuffles them with (seed, epoch), then packs them (or
buckets them by length) into rows of static shapes; batches are `batch_size` rows, with a leading
micro-batch axis when accumulating. The position (epoch, batch) is the iterator's whole state, so
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qlora_jax.data import packing
from qlora_jax.data.formats import Example, FormatConfig, format_row
from qlora_jax.data.packing import DEFAULT_MAX_SEGMENTS


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_seq_len: int = 512
    batch_size: int = 8
    packing: bool = True  # False: one example per row, padded to the smallest bucket that fits
    max_segments_per_row: int = DEFAULT_MAX_SEGMENTS  # examples a packed row may hold
    buckets: tuple[int, ...] = ()  # bucket lengths when not packing (default: max_seq_len / 4, / 2, / 1)
    accumulation_steps: int = 1
    seed: int = 0

    def bucket_lengths(self) -> tuple[int, ...]:
        if self.buckets:
            if max(self.buckets) > self.max_seq_len:
                raise ValueError(f"bucket {max(self.buckets)} exceeds data.max_seq_len={self.max_seq_len}")
            return tuple(sorted(self.buckets))
        return tuple(sorted({max(self.max_seq_len // 4, 1), max(self.max_seq_len // 2, 1), self.max_seq_len}))


def tokenize(
    rows: Sequence[dict[str, Any]], tokenizer: Any, fmt: FormatConfig, source: str = "the dataset"
) -> list[Example]:
    """Every row formatted and tokenized; errors name `source` and the row's index in it."""
    if not rows:
        raise ValueError(f"{source}: no rows (empty dataset)")
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(format_row(row, tokenizer, fmt, i))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    return examples


@dataclasses.dataclass
class BatchIterator:
    """Endless batches over `examples`; `state()`/`restore()` give the exact position."""

    examples: list[Example]
    cfg: BatchingConfig
    epoch: int = 0
    index: int = 0  # batch within the epoch
    truncation: packing.TruncationStats = dataclasses.field(default_factory=packing.TruncationStats)
    _epoch_batches: list[dict[str, np.ndarray]] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._epoch_batches = int(state["epoch"]), int(state["index"]), None

    def _build_epoch(self) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.cfg.seed, self.epoch])
        order = rng.permutation(len(self.examples))
        shuffled = [self.examples[i] for i in order]
        stats = packing.TruncationStats()
        per_batch = self.cfg.batch_size
        segments = self.cfg.max_segments_per_row if self.cfg.packing else 1
        if self.cfg.packing:
            groups = [packing.pack(shuffled, self.cfg.max_seq_len, stats, segments)]
        else:
            groups = list(packing.bucket(shuffled, self.cfg.bucket_lengths(), stats).values())
        k = self.cfg.accumulation_steps
        rows_per_step = per_batch * k
        batches = []
        for rows in groups:  # one step never mixes buckets: its micro-batches share a shape
            for start in range(0, len(rows) - rows_per_step + 1, rows_per_step):
                micro = [
                    packing.stack(rows[m : m + per_batch], segments)
                    for m in range(start, start + rows_per_step, per_batch)
                ]
                batches.append(
                    micro[0] if k == 1 else {key: np.stack([b[key] for b in micro]) for key in micro[0]}
                )
        if not self.cfg.packing:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.epoch == 0:
            self.truncation = stats
        if stats.examples and stats.dropped_examples == stats.examples:
            longest = max(len(e.ids) for e in self.examples)
            raise ValueError(
                f"every example is longer than data.max_seq_len={self.cfg.max_seq_len}: "
                f"{stats.describe()}; the longest has {longest} tokens: raise data.max_seq_len"
            )
        if not batches:
            raise ValueError(
                f"{len(self.examples)} examples make no full batch of {per_batch} rows x {k} micro-batches "
                f"at max_seq_len={self.cfg.max_seq_len}; lower train.batch_size or add data"
            )
        return batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def peek(self) -> dict[str, np.ndarray]:
        """The batch `next` will return, without moving (the run compiles its step for it)."""
        epoch, index, batches = self.epoch, self.index, self._epoch_batches
        batch = next(self)
        self.epoch, self.index, self._epoch_batches = epoch, index, batches
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        if self._epoch_batches is None:
            self._epoch_batches = self._build_epoch()
        if self.index >= len(self._epoch_batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._epoch_batches = self._build_epoch()
        batch = self._epoch_batches[self.index]
        self.index += 1
        return batch

    def batches_per_epoch(self) -> int:
        if self._epoch_batches is None:
            self._epoch_batches = self._build_epoch()
        return len(self._epoch_batches)


def eval_batches(examples: list[Example], cfg: BatchingConfig) -> list[dict[str, np.ndarray]]:
    """All eval examples packed in order, the last batch filled with empty rows (no loss)."""
    rows = packing.pack(examples, cfg.max_seq_len, max_segments=cfg.max_segments_per_row)
    pad = -len(rows) % cfg.batch_size
    rows += [packing.empty_row(cfg.max_seq_len) for _ in range(pad)]
    return [
        packing.stack(rows[i : i + cfg.batch_size], cfg.max_segments_per_row)
        for i in range(0, len(rows), cfg.batch_size)
    ]
