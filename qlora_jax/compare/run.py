"""One configured fine-tune run in qlora_jax and in transformers + peft on identical batches.

Both sides start from the same weights (the torch model is built from our loaded tree; with
quantization both use bitsandbytes' own 4-bit codes) and the same initial adapters (peft's, copied
into ours). Each step feeds the same token arrays to both; dropout masks differ across frameworks,
so with lora.dropout > 0 the runs compare as distributions, not step by step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import peft
import torch
from tqdm import tqdm

from qlora_jax import lora as lora_lib
from qlora_jax import sharding
from qlora_jax.compare import report, torch_reference
from qlora_jax.compare.torch_side import TorchTrainer
from qlora_jax.data.formats import prompt_and_reference
from qlora_jax.io import hf
from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.models.frozen import Quantization
from qlora_jax.models.presets import PRESETS
from qlora_jax.train import build, evaluate
from qlora_jax.train import step as step_lib
from qlora_jax.train.config import RunConfig
from qlora_jax.train.optim import learning_rate, make_optimizer


def load_both(run: RunConfig) -> tuple[Any, Any, Any, Any]:
    """(our model, our frozen tree, tokenizer, transformers model) with the same base weights."""
    path = run.model.path or embedded_model_path()
    if path in PRESETS:
        raise ValueError(
            f"model.path={path!r} is a preset; the comparison needs a HF directory or .gguf file"
        )
    model, frozen, tokenizer = build.load_model(run)
    model_cfg, dense = hf.load(path, Quantization(None), "float32")
    torch_dtype = getattr(torch, run.model.dtype)
    hf_model = torch_reference.hf_model_from_frozen(model_cfg, dense).to(torch_dtype)
    quant = run.model.quantization
    if quant.quant_type is not None:
        torch_reference.quantize_with_bnb(
            hf_model, torch_dtype, quant.quant_type, quant.block_size, quant.double_quant
        )
        frozen = jax.device_put(torch_reference.frozen_from_bnb(frozen, hf_model))
    return model, frozen, tokenizer, hf_model


def compare(run: RunConfig) -> dict[str, Any]:
    """Train both sides for train.max_steps; write losses, plot, summary and generations to output_dir."""
    run_dir = run.output_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(run.recipe_json)
    torch.manual_seed(run.train.seed)
    lora_cfg, optim_cfg = run.lora, run.optim
    model, frozen, tokenizer, hf_model = load_both(run)
    peft_model = peft.get_peft_model(hf_model, torch_reference.peft_config(lora_cfg))
    fresh = lora_lib.init_lora(jax.random.key(run.train.seed), frozen, model.config, lora_cfg)
    lora = jax.device_put(torch_reference.copy_adapters_into(fresh, peft_model))
    optimizer = make_optimizer(optim_cfg)
    state_shardings = sharding.default_shardings(jax.eval_shape(optimizer.init, lora))
    opt_state = step_lib.init_opt_state(optimizer, lora, optim_cfg, state_shardings)
    train_step = step_lib.make_train_step(
        model, lora_cfg, optim_cfg, optimizer, state_shardings, run.train.loss_chunk
    )
    eval_fn = evaluate.make_eval_loss(model, lora_cfg, run.train.loss_chunk)
    trainer = TorchTrainer(peft_model, optim_cfg)
    schedule = learning_rate(optim_cfg)
    batches, eval_rows, eval_set = build.load_data(
        run.data, build.read_rows(run.data), run.train.eval_batches, tokenizer
    )

    def eval_both() -> dict[str, float]:
        return {
            "jax": evaluate.eval_loss(eval_fn, lora, frozen, eval_set),
            "torch": trainer.eval_loss(eval_set),
        }

    summary: dict[str, Any] = {"eval_loss_before": eval_both()}
    rows = []
    rng = jax.random.key(run.train.seed)
    with open(os.path.join(run_dir, "losses.jsonl"), "w") as f:
        for step in tqdm(range(1, run.train.max_steps + 1), desc="compare", unit="step"):
            batch = next(batches)
            rng, step_rng = jax.random.split(rng)
            start = time.perf_counter()
            lora, opt_state, metrics = train_step(lora, opt_state, frozen, batch, step_rng)
            loss_jax = float(metrics["loss"])
            middle = time.perf_counter()
            theirs = trainer.step(batch)
            row = {
                "step": step,
                "loss_jax": loss_jax,
                "loss_torch": theirs["loss"],
                "lr_jax": float(schedule(step - 1)),
                "lr_torch": theirs["lr"],
                "grad_norm_jax": float(metrics["grad_norm"]),
                "grad_norm_torch": theirs["grad_norm"],
                "seconds_jax": middle - start,
                "seconds_torch": time.perf_counter() - middle,
            }
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
    summary["eval_loss_after"] = eval_both()
    summary["loss_delta"] = report.delta_stats(rows, run.compare.first_steps)
    timed = rows[1:] or rows  # step 1 includes JAX compilation
    summary["seconds_per_step"] = {
        side: sum(r[f"seconds_{side}"] for r in timed) / len(timed) for side in ("jax", "torch")
    }
    summary["exact_match"] = generate_both(run, model, frozen, lora, tokenizer, trainer, eval_rows, run_dir)
    base = "dense" if quant_type(run) is None else quant_type(run)
    title = f"{base} base, {run.model.dtype} compute, dropout {run.lora.dropout}"
    report.plot_losses(os.path.join(run_dir, "loss_curves.png"), rows, title)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = report.summary_markdown(summary)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(f"# {title}, {len(rows)} steps\n\n{table}")
    print(table)
    return summary


def quant_type(run: RunConfig) -> str | None:
    return run.model.quantization.quant_type


def generate_both(run, model, frozen, lora, tokenizer, trainer, eval_rows, run_dir) -> dict[str, Any]:
    """Greedy answers of both sides to compare.prompts held-out prompts; exact-match of each."""
    n = min(run.compare.prompts, len(eval_rows))
    fmt = run.data.format
    mode, max_new_tokens = run.train.exact_match, run.train.max_new_tokens
    pairs_in = [prompt_and_reference(r, tokenizer, fmt, i) for i, r in enumerate(eval_rows[:n])]
    prompts, refs = [p for p, _ in pairs_in], [r for _, r in pairs_in]
    acc_jax, pairs = evaluate.exact_match(model, frozen, lora, tokenizer, prompts, refs, mode, max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    theirs = trainer.generate(prompts, max_new_tokens, pad_id)
    records = [
        {
            "prompt": tokenizer.decode(p),
            "reference": ref,
            "jax": generated,
            "torch": tokenizer.decode(t, skip_special_tokens=True),
        }
        for p, ref, (generated, _), t in zip(prompts, refs, pairs, theirs, strict=True)
    ]
    report.write_generations(run_dir, records)
    correct = [evaluate.answers_match(r["torch"], r["reference"], mode) for r in records]
    return {"prompts": n, "jax": acc_jax, "torch": sum(correct) / max(n, 1)}
