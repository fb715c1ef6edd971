"""The training run, top to bottom: model, adapters, optimizer, data, then one loop of steps.

Step N+1 is dispatched before step N's metrics are pulled to the host, so the device never
waits for Python; the NaN check runs on those lagged metrics and stops the run at that step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from qlora_jax import lora as lora_lib
from qlora_jax import sharding
from qlora_jax.data import pipeline, sources
from qlora_jax.data.formats import prompt_and_reference
from qlora_jax.export import export_adapter
from qlora_jax.io import checkpoint
from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.io.hf import load_config, load_tokenizer
from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.presets import PRESETS
from qlora_jax.train import evaluate, plots, settings
from qlora_jax.train import step as step_lib
from qlora_jax.train.metrics import MetricsWriter, read_metrics, tensorboard_available
from qlora_jax.train.optim import learning_rate, make_optimizer

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "plots", "adapter", "config.json")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


def prepare_run_dir(c: Any) -> None:
    """A fresh run never mixes into an earlier run's files: refuse, unless resume or overwrite says so."""
    found = [n for n in ("checkpoints", "metrics.jsonl") if os.path.exists(os.path.join(c.output_dir, n))]
    if found and not c.resume:
        if not c.overwrite:
            raise settings.ConfigError(
                f"output_dir={c.output_dir!r} already holds a run ({', '.join(found)}); continue it with "
                "--config.resume=auto or replace it with --config.overwrite=True"
            )
        for name in RUN_FILES:
            path = os.path.join(c.output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(c.output_dir, exist_ok=True)


def check_tokenizer(tokenizer: Any, tokenizer_path: str, model_cfg: LlamaConfig, model_path: str) -> None:
    """Token ids past the embedding rows would index garbage: refuse a tokenizer larger than the model's."""
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but model {model_path!r} has "
            f"{model_cfg.vocab_size} embedding rows (vocab_size); use the tokenizer saved with the model"
        )


def open_model(c: Any) -> tuple[str, LlamaConfig, Any]:
    """(model path, architecture, tokenizer), all cheap to read; the settings are checked against the
    architecture (config.json / GGUF metadata) so a bad value stops before any weight is read."""
    path = c.model.path or embedded_model_path()
    model_cfg = PRESETS[path] if path in PRESETS else load_config(path, remat_policy=c.model.remat_policy)
    settings.validate_for_model(c, model_cfg)
    tokenizer_path = c.model.tokenizer or ("" if path in PRESETS else path)
    if not tokenizer_path:
        raise settings.ConfigError(f"model.path={path!r} is a preset: set model.tokenizer to tokenize data")
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer(tokenizer, tokenizer_path, model_cfg, path)
    return path, model_cfg, tokenizer


def load_weights(c: Any, path: str) -> tuple[llama.Llama, Any]:
    """(model, frozen): random weights for a preset name, else streamed and quantized from the file."""
    quant, runtime = settings.quantization(c), {"remat_policy": c.model.remat_policy}
    if path in PRESETS:
        return llama.random_init(path, quant, c.model.dtype, seed=c.train.seed, **runtime)
    return llama.from_pretrained(path, quant, c.model.dtype, **runtime)


def load_model(c: Any) -> tuple[llama.Llama, Any, Any]:
    """(model, frozen, tokenizer) from model.path: a file/dir, a preset name, or "" (embedded)."""
    path, _, tokenizer = open_model(c)
    return *load_weights(c, path), tokenizer


def load_examples(c: Any, tokenizer: Any, fmt: Any) -> tuple[list, list[dict], list]:
    """(train examples, eval rows, eval examples); without data.eval_path a seeded fraction is held out.

    Rows are tokenized in file order, so a malformed row's error gives its index in the file.
    """
    seed = c.train.seed
    rows = sources.load_rows(c.data.train_path, "train", seed)
    examples = pipeline.tokenize(rows, tokenizer, fmt, c.data.train_path)
    if c.data.eval_path:
        eval_rows = sources.load_rows(c.data.eval_path, "eval", seed)
        return examples, eval_rows, pipeline.tokenize(eval_rows, tokenizer, fmt, c.data.eval_path)
    n_eval = int(len(rows) * c.data.eval_fraction)
    order = np.random.default_rng(seed).permutation(len(rows))
    held_out = order[:n_eval]
    return [examples[i] for i in order[n_eval:]], [rows[i] for i in held_out], [examples[i] for i in held_out]


def load_data(c: Any, tokenizer: Any) -> tuple[pipeline.BatchIterator, list[dict], list[dict]]:
    """(train batches, eval rows, eval batches capped at train.eval_batches), as a run sees them."""
    batching = settings.batching_config(c)
    train_examples, eval_rows, eval_examples = load_examples(c, tokenizer, settings.format_config(c))
    eval_set = pipeline.eval_batches(eval_examples, batching) if eval_examples else []
    if c.train.eval_batches:
        eval_set = eval_set[: c.train.eval_batches]
    return pipeline.BatchIterator(train_examples, batching), eval_rows, eval_set


def _peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def train_and_evaluate(c: Any) -> dict[str, Any]:
    """Run the configured fine-tune; returns the end-of-run summary (also written to summary.json)."""
    settings.validate(c)
    d = c.distributed
    sharding.initialize_distributed(d.mode, d.coordinator, d.num_processes, d.process_id)
    lead = jax.process_index() == 0  # the one process that writes files
    run_dir = c.output_dir
    # optional writers are looked for now, not after the model is built
    tensorboard, can_plot = (tensorboard_available(), plots.available()) if lead else (False, False)
    if lead:
        prepare_run_dir(c)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=2))
    lora_cfg, optim_cfg = settings.lora_config(c), settings.optim_config(c)
    fmt = settings.format_config(c)
    mesh = sharding.make_mesh(settings.mesh_config(c))

    base_path, _, tokenizer = open_model(c)
    # data before weights: a malformed row stops the run before a large model is read and quantized
    batches, eval_rows, eval_set = load_data(c, tokenizer)
    eval_set = [sharding.shard_batch(mesh, b) for b in eval_set]
    print(
        f"data: {len(batches.examples)} train rows -> {batches.batches_per_epoch()} batches/epoch "
        f"({batches.truncation.describe()}); {len(eval_rows)} eval rows"
    )

    model, frozen = load_weights(c, base_path)
    fingerprint = checkpoint.base_fingerprint(model.config, frozen)  # before the base is split
    frozen = sharding.place(frozen, sharding.frozen_shardings(mesh, frozen))
    print(lora_lib.trainable_parameters_line(model.config, lora_cfg))
    rng = jax.random.key(c.train.seed)
    init_rng, rng = jax.random.split(rng)
    lora = lora_lib.init_lora(init_rng, frozen, model.config, lora_cfg)
    lora_shardings = sharding.lora_shardings(mesh, lora)
    lora = sharding.place(lora, lora_shardings)
    optimizer = make_optimizer(optim_cfg)
    abstract_state = jax.eval_shape(optimizer.init, lora)
    state_shardings = sharding.opt_state_shardings(mesh, abstract_state)
    opt_state = step_lib.init_opt_state(optimizer, lora, optim_cfg, state_shardings)
    train_step = step_lib.make_train_step(
        model,
        lora_cfg,
        optim_cfg,
        optimizer,
        state_shardings,
        c.train.loss_chunk,
        lora_shardings,
        skip_nonfinite=c.train.nonfinite == "skip",
    )
    micro_axis = optim_cfg.accumulation_steps > 1
    schedule = learning_rate(optim_cfg)
    eval_loss_fn = evaluate.make_eval_loss(model, lora_cfg, c.train.loss_chunk)

    def exact_match(tag: str) -> float | None:
        n = min(c.train.exact_match_examples, len(eval_rows))
        if not n:
            return None
        if jax.process_count() > 1:
            print(f"exact match {tag}: skipped (generation runs on one host; use qlora_jax.generate)")
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
    start_step, tokens_seen, skipped = 0, 0.0, 0
    if c.resume:  # settings.validate allows only "auto" here
        latest = checkpoints.latest_step()
        if latest is None:
            print(f"resume=auto: no complete checkpoint in {ckpt_dir}, starting fresh")
            if lead:
                truncate_metrics(run_dir, 0)
        else:
            checkpoint.check_same_base(checkpoints.record(latest), fingerprint, base_path)
            lora, opt_state, record = checkpoints.restore(latest, lora, abstract_state)
            opt_state = step_lib.place_opt_state(opt_state, optim_cfg, state_shardings)
            batches.restore(record["data"])
            rng = jax.random.wrap_key_data(np.asarray(record["rng"], np.uint32))
            start_step, tokens_seen = latest, record["tokens_seen"]
            skipped = record.get("skipped_steps", 0)
            if lead:
                truncate_metrics(run_dir, latest)
            print(f"resumed from step {latest} ({ckpt_dir})")

    last_saved = start_step or None

    def save_checkpoint(step: int) -> None:
        nonlocal last_saved
        record = {
            "step": step,
            "data": batches.state(),
            "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "tokens_seen": tokens_seen,
            "skipped_steps": skipped,
            "base_path": base_path,
            "base_fingerprint": fingerprint,
        }
        checkpoints.save(step, lora, opt_state, record)
        last_saved = step

    stop_signal: list[int] = []
    previous_handlers = {
        s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    writer = MetricsWriter(run_dir if lead else None, tensorboard)
    summary: dict[str, Any] = {
        "exact_match_before": exact_match("before training") if not start_step else None
    }
    start = time.perf_counter()
    pending = None  # (step, metrics on device, input tokens) of the previous step

    def log(step: int, metrics: dict, input_tokens: int, step_seconds: float) -> None:
        nonlocal skipped
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            what = f"loss {loss}, gradient norm {grad_norm} at step {step}"
            if c.train.nonfinite == "stop":
                kept = f"step {last_saved} in {ckpt_dir}" if last_saved else "none was saved"
                raise TrainingDiverged(
                    f"{what}: stopped (last checkpoint: {kept}); lower optim.lr, check the data, "
                    "or skip such batches with --config.train.nonfinite=skip"
                )
            skipped += 1  # the step left lora and the optimizer state as they were
            writer.write(step, {"skipped_steps": skipped})
            tqdm.write(f"{what}: batch skipped, no update ({skipped} skipped so far)")
            return
        row = {
            "loss": loss,
            "lr": float(schedule(step - 1)),
            "grad_norm": grad_norm,
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
            device_batch = sharding.shard_batch(mesh, batch, micro_axis)
            lora, opt_state, metrics = train_step(lora, opt_state, frozen, device_batch, step_rng)
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
    host_lora = sharding.gather_to_host(lora)  # every process takes part in the gather
    summary |= {
        "steps": c.train.max_steps,
        "loss_tokens": tokens_seen,
        "skipped_steps": skipped,
        "train_seconds": wall,
        "peak_device_bytes": _peak_device_bytes(),
        "adapter": adapter_dir,
    }
    export_adapter(adapter_dir, host_lora, lora_cfg, model.config, base_path, fingerprint)
    if lead:
        summary["plots"] = plots.draw(run_dir) if can_plot else []
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    sharding.wait_for_all("run files written")
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
