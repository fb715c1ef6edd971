"""What a run does around its steps, each with its own cadence: evaluation, checkpoints, metric
rows and the progress bar, stop signals, and the compiled step's memory report."""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from qlora_jax.data.formats import FormatConfig, prompt_and_reference
from qlora_jax.io import checkpoint
from qlora_jax.models.decoder import Llama
from qlora_jax.train import evaluate
from qlora_jax.train.config import CheckpointSettings, TrainSettings
from qlora_jax.train.metrics import MetricsWriter
from qlora_jax.train.optim import STATE_LAYOUT
from qlora_jax.train.state import TrainState, counters


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


class Evaluator:
    """Eval loss over the held-out batches and exact match of generated answers."""

    def __init__(
        self,
        model: Llama,
        lora_cfg: Any,
        train: TrainSettings,
        fmt: FormatConfig,
        eval_set: list,
        eval_rows: list[dict],
        tokenizer: Any,
    ):
        self.model, self.train, self.fmt = model, train, fmt
        self.eval_set, self.eval_rows, self.tokenizer = eval_set, eval_rows, tokenizer
        self._loss_fn = evaluate.make_eval_loss(model, lora_cfg, train.loss_chunk)

    def due(self, step: int) -> bool:
        """Mid-run evaluation every train.eval_every steps; the last step's comes with the summary."""
        every = self.train.eval_every
        return bool(every and self.eval_set and step % every == 0 and step != self.train.max_steps)

    def loss(self, lora: Any, frozen: Any) -> float | None:
        return evaluate.eval_loss(self._loss_fn, lora, frozen, self.eval_set) if self.eval_set else None

    def exact_match(self, lora: Any, frozen: Any, tag: str) -> float | None:
        n = min(self.train.exact_match_examples, len(self.eval_rows))
        if not n:
            return None
        if jax.process_count() > 1:
            print(f"exact match {tag}: skipped (generation runs on one host; use qlora_jax.generate)")
            return None
        rows = self.eval_rows[:n]
        prompts, refs = zip(
            *(prompt_and_reference(r, self.tokenizer, self.fmt, i) for i, r in enumerate(rows)), strict=True
        )
        acc, pairs = evaluate.exact_match(
            self.model,
            frozen,
            lora,
            self.tokenizer,
            prompts,
            refs,
            self.train.exact_match,
            self.train.max_new_tokens,
        )
        print(f"exact match {tag}: {acc:.1%} of {n} held-out examples")
        for (generated, reference), row in list(zip(pairs, rows, strict=False))[:3]:
            prompt = row.get(self.fmt.prompt_key, row.get("instruction", ""))
            answer, expected = generated.strip()[:60], reference.strip()[:40]
            print(f"  {str(prompt)[-60:]!r} -> {answer!r} (reference {expected!r})")
        return acc


class Checkpointer:
    """Train-state checkpoints every checkpoint.every steps (and on a stop signal), with the
    base's identity in each record so a resume on another base is refused."""

    def __init__(
        self, directory: str, settings: CheckpointSettings, resume: bool, base_path: str, fingerprint: str
    ):
        self.directory, self.every = directory, settings.every
        self.base_path, self.fingerprint = base_path, fingerprint
        use = settings.every or resume
        self.steps = checkpoint.TrainCheckpoints(directory, settings.keep) if use else None
        self.last_saved: int | None = None

    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0)

    def restore_latest(self, state_like: TrainState) -> TrainState | None:
        """The latest complete checkpoint's state (placed like `state_like`), or None."""
        latest = None if self.steps is None else self.steps.latest_step()
        if latest is None:
            return None
        record = self.steps.record(latest)
        checkpoint.check_same_base(record, self.fingerprint, self.base_path)
        checkpoint.check_optimizer_state(record, STATE_LAYOUT, latest)
        state, _ = self.steps.restore(latest, state_like)
        self.last_saved = latest
        return state

    def save(self, state: TrainState) -> None:
        record = counters(state) | {"base_path": self.base_path, "base_fingerprint": self.fingerprint}
        record["optimizer_state"] = STATE_LAYOUT
        self.steps.save(record["step"], state, record)
        self.last_saved = record["step"]

    def close(self) -> None:
        """Wait for the last write (CheckpointWriteError if it failed), then stop the writer."""
        if self.steps is None:
            return
        try:
            self.steps.wait()
        finally:
            self.steps.close()


class MetricLogger:
    """Training rows and the progress bar from each step's metrics, pulled one step late so the
    device never waits for Python; the non-finite check (stop or skip) runs on them."""

    def __init__(
        self,
        writer: MetricsWriter,
        train: TrainSettings,
        schedule: Any,
        start_step: int,
        checkpointer: Checkpointer,
    ):
        self.writer, self.train, self.schedule, self.checkpointer = writer, train, schedule, checkpointer
        self.bar = tqdm(
            range(start_step + 1, train.max_steps + 1),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            initial=start_step,
            total=train.max_steps,
        )
        self._pending: tuple[int, dict, int] | None = None
        self._last_time = time.perf_counter()

    def push(self, step: int, metrics: dict, input_tokens: int) -> None:
        """Log the previous step (its metrics are ready by now) and keep this one for later."""
        self.flush()
        self._pending = (step, metrics, input_tokens)

    def flush(self) -> None:
        if self._pending is None:
            return
        jax.block_until_ready(self._pending[1])
        now = time.perf_counter()
        self._log(*self._pending, now - self._last_time)
        self._last_time, self._pending = now, None

    def _log(self, step: int, metrics: dict, input_tokens: int, step_seconds: float) -> None:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            what = f"loss {loss}, gradient norm {grad_norm} at step {step}"
            if self.train.nonfinite == "stop":
                saved = self.checkpointer.last_saved
                kept = f"step {saved} in {self.checkpointer.directory}" if saved else "none was saved"
                raise TrainingDiverged(
                    f"{what}: stopped (last checkpoint: {kept}); lower optim.lr, check the data, "
                    "or skip such batches with --config.train.nonfinite=skip"
                )
            skipped = int(metrics["skipped_steps"])  # the step left lora and the optimizer state as they were
            self.writer.write(step, {"skipped_steps": skipped})
            tqdm.write(f"{what}: batch skipped, no update ({skipped} skipped so far)")
            return
        row = {
            "loss": loss,
            "lr": float(self.schedule(step - 1)),
            "grad_norm": grad_norm,
            "tokens_per_s": input_tokens / step_seconds,  # non-padding input tokens
            "loss_tokens": float(metrics["tokens"]),
            "step_time_s": step_seconds,
        }
        if step % self.train.log_every == 0 or step == self.train.max_steps:
            self.writer.write(step, row)
        self.bar.set_postfix(
            loss=f"{loss:.3f}",
            lr=f"{row['lr']:.2e}",
            tok_s=f"{row['tokens_per_s']:.0f}",
            step_s=f"{step_seconds:.2f}",
        )

    def close(self) -> None:
        self.bar.close()


class StopSignal:
    """SIGTERM/SIGINT noted, not fatal, while the loop runs: it saves a checkpoint and stops."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, lambda signum, _: self.received.append(signum))
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The compiled step's device memory (XLA's memory_analysis) next to the device's capacity."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    capacity: int | None

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @classmethod
    def of(cls, compiled: Any) -> MemoryEstimate | None:
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        stats = jax.local_devices()[0].memory_stats() or {}
        return cls(
            arguments=int(analysis.argument_size_in_bytes),
            outputs=int(analysis.output_size_in_bytes),
            temporaries=int(analysis.temp_size_in_bytes),
            aliased=int(analysis.alias_size_in_bytes),
            capacity=stats.get("bytes_limit"),
        )

    def line(self) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        parts = f"arguments {gib(self.arguments)}, temporaries {gib(self.temporaries)}"
        device = f"of {gib(self.capacity)} on the device" if self.capacity else "(device capacity unknown)"
        return f"memory: the compiled step needs {gib(self.total)} ({parts}) {device}"

    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def as_dict(self) -> dict[str, int | None]:
        return {
            "arguments_bytes": self.arguments,
            "outputs_bytes": self.outputs,
            "temporaries_bytes": self.temporaries,
            "aliased_bytes": self.aliased,
            "total_bytes": self.total,
            "device_capacity_bytes": self.capacity,
        }


def report_memory(compiled: Any) -> dict[str, int | None] | None:
    """Print the compiled step's memory need before step 1, and what to change if it cannot fit."""
    estimate = MemoryEstimate.of(compiled)
    if estimate is None:
        return None
    print(estimate.line())
    if not estimate.fits():
        print(
            "warning: the step needs more memory than the device has and will run out of memory: lower "
            "train.batch_size or data.max_seq_len, set model.remat_policy=auto (or offload / "
            "offload_attention), model.offload_head=True, a smaller model.seq_tile or train.loss_chunk, "
            "optim.offload_state=True, or split the model with mesh.fsdp (README, Troubleshooting)"
        )
    return estimate.as_dict()
