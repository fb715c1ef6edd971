"""The training run, top to bottom: build, maybe resume, loop over steps, finish.

Step N+1 is dispatched before step N's metrics are pulled to the host, so the device never
waits for Python; the non-finite check runs on those lagged metrics and stops the run at that step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from qlora_jax import lora as lora_lib
from qlora_jax import sharding
from qlora_jax.data.pipeline import BatchIterator
from qlora_jax.io import checkpoint
from qlora_jax.io.adapter import export_adapter
from qlora_jax.models.decoder import Llama
from qlora_jax.train import build, plots
from qlora_jax.train import step as step_lib
from qlora_jax.train.config import RunConfig
from qlora_jax.train.embedding_lookup import HostEmbeddingLookup
from qlora_jax.train.hooks import Checkpointer, Evaluator, MetricLogger, StopSignal, report_memory
from qlora_jax.train.metrics import MetricsWriter, tensorboard_available
from qlora_jax.train.optim import learning_rate, make_optimizer
from qlora_jax.train.run_dir import prepare_run_dir, truncate_metrics, write_json
from qlora_jax.train.state import TrainState, counters, data_position, new_state


@dataclasses.dataclass
class Run:
    """A built run: what the loop reads (model, base, data, step) and the state it advances."""

    cfg: RunConfig
    model: Llama
    frozen: Any
    mesh: Any
    batches: BatchIterator
    lookup: HostEmbeddingLookup  # each training batch's embedding rows, when the table is on the host
    evaluator: Evaluator
    checkpointer: Checkpointer
    step: step_lib.StateStep
    state: TrainState
    base_path: str
    fingerprint: str


def build_run(run: RunConfig) -> Run:
    """Data files, tokenizer and tokenized data first (a bad file or row stops the run before a large
    model is read), then the base (placed on the mesh), adapters, optimizer and the jitted step."""
    mesh = sharding.make_mesh(run.mesh)
    rows = build.read_rows(run.data)
    base_path, _, tokenizer = build.open_model(run)
    batches, eval_rows, eval_set = build.load_data(run.data, rows, run.train.eval_batches, tokenizer)
    print(
        f"data: {len(batches.examples)} train rows -> {batches.batches_per_epoch()} batches/epoch "
        f"({batches.truncation.describe()}); {len(eval_rows)} eval rows"
    )
    model, frozen = build.load_weights(run.model, base_path, run.train.seed, mesh)  # split as it loads
    fingerprint = checkpoint.base_fingerprint(model.config, frozen)
    print(lora_lib.trainable_parameters_line(model.config, run.lora))
    init_key, run_key = jax.random.split(jax.random.key(run.train.seed))
    lora = lora_lib.init_lora(init_key, frozen, model.config, run.lora)
    lora_shardings = sharding.lora_shardings(mesh, lora)
    optimizer = make_optimizer(run.optim)
    opt_shardings = sharding.opt_state_shardings(mesh, jax.eval_shape(optimizer.init, lora))
    lora = sharding.place(lora, lora_shardings)
    opt_state = step_lib.init_opt_state(optimizer, lora, run.optim, opt_shardings)
    replicated = sharding.replicated(mesh)
    shardings = step_lib.state_shardings(lora_shardings, opt_shardings, run.optim, replicated)
    state = new_state(lora, opt_state, run_key, replicated)
    step = step_lib.make_state_step(
        model,
        run.lora,
        run.optim,
        optimizer,
        shardings,
        opt_shardings,
        run.train.loss_chunk,
        skip_nonfinite=run.train.nonfinite == "skip",
    )
    evaluator = Evaluator(
        model,
        run.lora,
        run.train,
        run.data.format,
        [sharding.shard_batch(mesh, b) for b in eval_set],
        eval_rows,
        tokenizer,
    )
    checkpointer = Checkpointer(
        os.path.join(run.output_dir, "checkpoints"), run.checkpoint, run.resume, base_path, fingerprint
    )
    return Run(
        run,
        model,
        frozen,
        mesh,
        batches,
        HostEmbeddingLookup(frozen),
        evaluator,
        checkpointer,
        step,
        state,
        base_path,
        fingerprint,
    )


def resume(r: Run, lead: bool) -> None:
    """Continue from the latest checkpoint in output_dir, or start fresh if there is none."""
    restored = r.checkpointer.restore_latest(r.state)
    if restored is None:
        print(f"resume=auto: no complete checkpoint in {r.checkpointer.directory}, starting fresh")
        latest = 0
    else:
        r.state = restored
        r.batches.restore(data_position(restored))
        latest = int(restored.step)
        print(f"resumed from step {latest} ({r.checkpointer.directory})")
    if lead:
        truncate_metrics(r.cfg.output_dir, latest)


def train_and_evaluate(run: RunConfig) -> dict[str, Any]:
    """Run the configured fine-tune; returns the end-of-run summary (also written to summary.json)."""
    d = run.distributed
    sharding.initialize_distributed(d.mode, d.coordinator, d.num_processes, d.process_id)
    lead = jax.process_index() == 0  # the one process that writes files
    # optional writers are looked for now, not after the model is built
    tensorboard, can_plot = (tensorboard_available(), plots.available()) if lead else (False, False)
    if lead:
        prepare_run_dir(run.output_dir, run.resume, run.overwrite)
        with open(os.path.join(run.output_dir, "config.json"), "w") as f:
            f.write(run.recipe_json)
    r = build_run(run)
    if run.resume:
        resume(r, lead)
    start_step = int(r.state.step)
    summary: dict[str, Any] = {"memory_estimate": report_memory(first_compile(r))}
    # the compile's own peak (XLA's GPU autotuner, skipped when the step comes from the cache)
    summary["peak_device_bytes_after_compile"] = _peak_device_bytes()
    if lead:
        write_json(run.output_dir, "summary.json", summary)
    writer = MetricsWriter(run.output_dir if lead else None, tensorboard)
    logger = MetricLogger(writer, run.train, learning_rate(run.optim), start_step, r.checkpointer)
    summary["exact_match_before"] = (
        None if start_step else r.evaluator.exact_match(r.state.lora, r.frozen, "before training")
    )
    start = time.perf_counter()
    with StopSignal() as stop:
        try:
            for step in logger.bar:
                batch = next(r.batches)
                position = np.asarray([r.batches.epoch, r.batches.index], np.int32)
                r.state, metrics = r.step(r.state, r.frozen, shard(r, batch), position)
                logger.push(step, metrics, int(np.count_nonzero(batch["segment_ids"])))
                if r.evaluator.due(step):
                    writer.write(step, {"eval_loss": r.evaluator.loss(r.state.lora, r.frozen)})
                if stop.received or r.checkpointer.due(step):
                    logger.flush()  # a run resumed from this checkpoint starts at the next step
                    r.checkpointer.save(r.state)
                if stop.received:
                    break
            logger.flush()
        except BaseException:
            writer.close()  # a failed run still flushes the TensorBoard scalars it logged
            raise
        finally:
            logger.close()
            r.checkpointer.close()
    if stop.received:
        writer.close()
        step = int(r.state.step)
        print(
            f"stopped by signal {stop.received[0]} after step {step}; checkpoint saved, "
            "resume with --config.resume=auto"
        )
        return {"stopped_at": step}
    return finish(r, summary, writer, time.perf_counter() - start, start_step, lead, can_plot)


def shard(r: Run, batch: dict[str, np.ndarray]) -> dict:
    """A training batch on the mesh, with its embedding rows where the table is on the host (each
    process looks up only its own rows)."""
    return sharding.shard_batch(r.mesh, batch, r.cfg.optim.accumulation_steps > 1, complete=r.lookup)


def first_compile(r: Run) -> Any:
    """Compile the step for the first batch's shapes (peeked, not consumed) before step 1."""
    return r.step.compile(r.state, r.frozen, shard(r, r.batches.peek()), np.zeros((2,), np.int32))


def finish(
    r: Run,
    summary: dict[str, Any],
    writer: MetricsWriter,
    wall: float,
    start_step: int,
    lead: bool,
    can_plot: bool,
) -> dict[str, Any]:
    """Final eval and exact match, the adapter (PEFT + Orbax), plots and summary.json."""
    run, state = r.cfg, r.state
    max_steps = run.train.max_steps
    if (eval_loss := r.evaluator.loss(state.lora, r.frozen)) is not None:
        summary["eval_loss"] = eval_loss
        writer.write(max_steps, {"eval_loss": eval_loss})
    writer.close()
    summary["exact_match_after"] = r.evaluator.exact_match(state.lora, r.frozen, "after training")
    adapter_dir = os.path.join(run.output_dir, "adapter")
    host_lora = sharding.gather_to_host(state.lora)  # every process takes part in the gather
    totals = counters(state)
    summary |= {
        "steps": max_steps,
        "loss_tokens": totals["tokens_seen"],
        "skipped_steps": totals["skipped_steps"],
        "train_seconds": wall,
        "peak_device_bytes": _peak_device_bytes(),
        "adapter": adapter_dir,
    }
    export_adapter(adapter_dir, host_lora, run.lora, r.model.config, r.base_path, r.fingerprint)
    if lead:
        summary["plots"] = plots.draw(run.output_dir) if can_plot else []
        write_json(run.output_dir, "summary.json", summary)
    sharding.wait_for_all("run files written")
    peak = summary["peak_device_bytes"]
    print(
        f"done: {max_steps - start_step} steps, {totals['tokens_seen']:.0f} loss tokens, "
        f"{wall:.0f} s training"
        + (f", peak device memory {peak / 2**30:.2f} GiB" if peak else "")
        + f"; adapter in {adapter_dir}"
    )
    return summary


def _peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))
