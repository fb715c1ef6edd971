"""The training run, top to bottom: model, adapters, optimizer, data, then one loop of steps.

Step N+1 is dispatched before step N's metrics are pulled to the host, so the device never
waits for Python; the NaN check runs on those lagged metrics and stops the run at that step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from qlora_jax import lora as lora_lib
from qlora_jax.data import pipeline, sources
from qlora_jax.data.formats import prompt_and_reference
from qlora_jax.export import export_adapter
from qlora_jax.io import checkpoint
from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.io.hf import load_tokenizer
from qlora_jax.models import llama
from qlora_jax.models.presets import PRESETS
from qlora_jax.train import evaluate, plots, settings
from qlora_jax.train import step as step_lib
from qlora_jax.train.metrics import MetricsWriter, read_metrics
from qlora_jax.train.optim import learning_rate, make_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def load_model(c: Any) -> tuple[llama.Llama, Any, Any]:
    """(model, frozen, tokenizer) from model.path: a file/dir, a preset name, or "" (embedded)."""
    path = c.model.path or embedded_model_path()
    runtime = {"remat_policy": c.model.remat_policy}
    if path in PRESETS:
        model, frozen = llama.random_init(
            path, settings.quantization(c), c.model.dtype, seed=c.train.seed, **runtime
        )
        tokenizer = load_tokenizer(c.model.tokenizer) if c.model.tokenizer else None
        return model, frozen, tokenizer
    model, frozen = llama.from_pretrained(path, settings.quantization(c), c.model.dtype, **runtime)
    return model, frozen, load_tokenizer(c.model.tokenizer or path)


def _split_eval(c: Any, train_rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    if c.data.eval_path:
        return train_rows, sources.load_rows(c.data.eval_path, split="eval", seed=seed)
    n_eval = int(len(train_rows) * c.data.eval_fraction)
    order = np.random.default_rng(seed).permutation(len(train_rows))
    return [train_rows[i] for i in order[n_eval:]], [train_rows[i] for i in order[:n_eval]]


def load_data(c: Any, tokenizer: Any) -> tuple[pipeline.BatchIterator, list[dict], list[dict]]:
    """(train batches, eval rows, eval batches capped at train.eval_batches), as a run sees them."""
    fmt, batching = settings.format_config(c), settings.batching_config(c)
    train_rows, eval_rows = _split_eval(
        c, sources.load_rows(c.data.train_path, "train", c.train.seed), c.train.seed
    )
    batches = pipeline.BatchIterator(pipeline.tokenize(train_rows, tokenizer, fmt), batching)
    eval_examples = pipeline.tokenize(eval_rows, tokenizer, fmt) if eval_rows else []
    eval_set = pipeline.eval_batches(eval_examples, batching) if eval_examples else []
    if c.train.eval_batches:
        eval_set = eval_set[: c.train.eval_batches]
    return batches, eval_rows, eval_set


def _peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def train_and_evaluate(c: Any) -> dict[str, Any]:
    """Run the configured fine-tune; returns the end-of-run summary (also written to summary.json)."""
    run_dir = c.output_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    lora_cfg, optim_cfg = settings.lora_config(c), settings.optim_config(c)
    fmt = settings.format_config(c)

    model, frozen, tokenizer = load_model(c)
    if tokenizer is None:
        raise ValueError(f"model.path={c.model.path!r} is a preset: set model.tokenizer to tokenize data")
    print(lora_lib.trainable_parameters_line(model.config, lora_cfg))
    rng = jax.random.key(c.train.seed)
    init_rng, rng = jax.random.split(rng)
    lora = lora_lib.init_lora(init_rng, frozen, model.config, lora_cfg)
    optimizer = make_optimizer(optim_cfg)
    state_shardings = step_lib.default_shardings(jax.eval_shape(optimizer.init, lora))
    opt_state = step_lib.init_opt_state(optimizer, lora, optim_cfg, state_shardings)
    train_step = step_lib.make_train_step(
        model,
        lora_cfg,
        optim_cfg,
        optimizer,
        state_shardings if optim_cfg.offload_state else None,
        c.train.loss_chunk,
    )
    schedule = learning_rate(optim_cfg)

    batches, eval_rows, eval_set = load_data(c, tokenizer)
    print(
        f"data: {len(batches.examples)} train rows -> {batches.batches_per_epoch()} batches/epoch "
        f"({batches.truncation.describe()}); {len(eval_rows)} eval rows"
    )
    eval_loss_fn = evaluate.make_eval_loss(model, lora_cfg, c.train.loss_chunk)

    def exact_match(tag: str) -> float | None:
        n = min(c.train.exact_match_examples, len(eval_rows))
        if not n:
            return None
        prompts, refs = zip(
            *(prompt_and_reference(r, tokenizer, fmt, i) for i, r in enumerate(eval_rows[:n])), strict=True
        )
        acc, pairs = evaluate.exact_match(
            model, frozen, lora, tokenizer, prompts, refs, c.train.exact_match, c.train.max_new_tokens
        )
        print(f"exact match {tag}: {acc:.1%} of {n} held-out examples")
        for (generated, reference), row in list(zip(pairs, eval_rows, strict=False))[:3]:
            prompt = row.get(c.data.prompt_key, row.get("instruction", ""))
            answer, expected = generated.strip()[:60], reference.strip()[:40]
            print(f"  {str(prompt)[-60:]!r} -> {answer!r} (reference {expected!r})")
        return acc

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    checkpoints = (
        checkpoint.TrainCheckpoints(ckpt_dir, c.checkpoint.keep) if c.checkpoint.every or c.resume else None
    )
    fingerprint = checkpoint.base_fingerprint(model.config, frozen)
    base_path = c.model.path or embedded_model_path()
    start_step, tokens_seen = 0, 0.0
    if c.resume:
        if c.resume != "auto":
            raise ValueError(
                f"resume={c.resume!r} unknown; valid: '' (fresh run) or 'auto' (latest checkpoint)"
            )
        latest = checkpoints.latest_step()
        if latest is None:
            print(f"resume=auto: no complete checkpoint in {ckpt_dir}, starting fresh")
        else:
            checkpoint.check_same_base(checkpoints.record(latest), fingerprint, base_path)
            lora, opt_state, record = checkpoints.restore(latest, lora, jax.eval_shape(optimizer.init, lora))
            opt_state = step_lib.place_opt_state(opt_state, optim_cfg, state_shardings)
            batches.restore(record["data"])
            rng = jax.random.wrap_key_data(np.asarray(record["rng"], np.uint32))
            start_step, tokens_seen = latest, record["tokens_seen"]
            truncate_metrics(run_dir, latest)
            print(f"resumed from step {latest} ({ckpt_dir})")

    def save_checkpoint(step: int) -> None:
        record = {
            "step": step,
            "data": batches.state(),
            "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "tokens_seen": tokens_seen,
            "base_path": base_path,
            "base_fingerprint": fingerprint,
        }
        checkpoints.save(step, lora, opt_state, record)

    stop_signal: list[int] = []
    previous_handlers = {
        s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    writer = MetricsWriter(run_dir)
    summary: dict[str, Any] = {
        "exact_match_before": exact_match("before training") if not start_step else None
    }
    start = time.perf_counter()
    pending = None  # (step, metrics on device, input tokens) of the previous step

    def log(step: int, metrics: dict, input_tokens: int, step_seconds: float) -> None:
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {step}; lower optim.lr or check the data")
        row = {
            "loss": loss,
            "lr": float(schedule(step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_s": input_tokens / step_seconds,  # non-padding input tokens
            "loss_tokens": float(metrics["tokens"]),
            "step_time_s": step_seconds,
        }
        if step % c.train.log_every == 0 or step == c.train.max_steps:
            writer.write(step, row)
        bar.set_postfix(
            loss=f"{loss:.3f}",
            lr=f"{row['lr']:.2e}",
            tok_s=f"{row['tokens_per_s']:.0f}",
            step_s=f"{step_seconds:.2f}",
        )

    bar = tqdm(
        range(start_step + 1, c.train.max_steps + 1),
        desc="train",
        unit="step",
        dynamic_ncols=True,
        initial=start_step,
        total=c.train.max_steps,
    )
    last_time = time.perf_counter()
    step = start_step
    try:
        for step in bar:
            batch = next(batches)
            rng, step_rng = jax.random.split(rng)
            lora, opt_state, metrics = train_step(lora, opt_state, frozen, batch, step_rng)
            tokens_seen += float(np.sum(batch["loss_mask"]))
            if pending is not None:
                now = time.perf_counter()
                log(*pending, now - last_time)
                last_time = now
            pending = (step, metrics, int(np.count_nonzero(batch["segment_ids"])))
            if (
                c.train.eval_every
                and step % c.train.eval_every == 0
                and eval_set
                and step != c.train.max_steps
            ):
                writer.write(step, {"eval_loss": evaluate.eval_loss(eval_loss_fn, lora, frozen, eval_set)})
            if stop_signal or (c.checkpoint.every and step % c.checkpoint.every == 0):
                # log this step first: a run resumed from this checkpoint starts at the next step
                now = time.perf_counter()
                log(*pending, now - last_time)
                last_time, pending = now, None
                save_checkpoint(step)
            if stop_signal:
                break
        if pending is not None:
            jax.block_until_ready(pending[1])
            log(*pending, time.perf_counter() - last_time)
    finally:
        bar.close()
        if checkpoints is not None:
            checkpoints.wait()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stop_signal:
        writer.close()
        print(
            f"stopped by signal {stop_signal[0]} after step {step}; checkpoint saved, "
            "resume with --config.resume=auto"
        )
        return {"stopped_at": step}
    wall = time.perf_counter() - start
    if eval_set:
        summary["eval_loss"] = evaluate.eval_loss(eval_loss_fn, lora, frozen, eval_set)
        writer.write(c.train.max_steps, {"eval_loss": summary["eval_loss"]})
    writer.close()
    summary["exact_match_after"] = exact_match("after training")
    adapter_dir = os.path.join(run_dir, "adapter")
    export_adapter(adapter_dir, lora, lora_cfg, model.config, base_path, fingerprint)
    summary |= {
        "steps": c.train.max_steps,
        "loss_tokens": tokens_seen,
        "train_seconds": wall,
        "peak_device_bytes": _peak_device_bytes(),
        "plots": plots.draw(run_dir),
        "adapter": adapter_dir,
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    peak = summary["peak_device_bytes"]
    print(
        f"done: {c.train.max_steps - start_step} steps, {tokens_seen:.0f} loss tokens, {wall:.0f} s training"
        + (f", peak device memory {peak / 2**30:.2f} GiB" if peak else "")
        + f"; adapter in {adapter_dir}"
    )
    return summary


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric rows after `step`: a resumed run writes them again."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
