"""Export a run's adapter (PEFT, Orbax), the merged model (HF safetensors) or its 4-bit base in
the bitsandbytes format (bnb4bit; with --merge the adapters folded in and requantized).

python -m qlora_jax.export --run runs/smollm2_demo --format peft|orbax|merged|bnb4bit --out DIR
The adapter is the run's latest train checkpoint if it has one, else its exported adapter/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from qlora_jax import lora as lora_lib
from qlora_jax.io import checkpoint, peft
from qlora_jax.models.frozen import Quantization
from qlora_jax.train import build, config
from qlora_jax.train.config import RunConfig
from qlora_jax.train.optim import STATE_LAYOUT, make_optimizer
from qlora_jax.train.state import abstract_state

FORMATS = ("peft", "orbax", "merged", "bnb4bit")


def load_run(run_dir: str) -> tuple[RunConfig, Any, Any, Any, Any, str]:
    """(run config, model, frozen, tokenizer, lora, fingerprint) of a finished or running run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    with open(path) as f:
        run = config.parse(ml_collections.ConfigDict(json.load(f)))
    model, frozen, tokenizer = build.load_model(run)
    fingerprint = checkpoint.base_fingerprint(model.config, frozen)
    lora_like = lora_lib.init_lora(jax.random.key(0), frozen, model.config, run.lora)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = checkpoint.TrainCheckpoints(ckpt_dir, async_save=False) if os.path.isdir(ckpt_dir) else None
    if steps is not None and steps.latest_step() is not None:
        checkpoint.check_optimizer_state(steps.record(steps.latest_step()), STATE_LAYOUT, steps.latest_step())
        opt_like = jax.eval_shape(make_optimizer(run.optim).init, lora_like)
        state, record = steps.restore(steps.latest_step(), abstract_state(lora_like, opt_like))
        lora = state.lora
        print(f"adapter from checkpoint step {steps.latest_step()}")
    else:
        lora, record = checkpoint.load_adapter_orbax(os.path.join(run_dir, "adapter", "orbax"), lora_like)
        print(f"adapter from {run_dir}/adapter/orbax")
    checkpoint.check_same_base(record, fingerprint, run.model.path)
    return run, model, frozen, tokenizer, lora, fingerprint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (output_dir of a training run)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the dense tensors (merged: all; bnb4bit: all but the 4-bit linears)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="bnb4bit: fold the adapters in and requantize the linears (reports the requantization error)",
    )
    parser.add_argument(
        "--requantize_error",
        action="store_true",
        help="merged: also report the error of re-quantizing the merged linears to NF4",
    )
    args = parser.parse_args(argv)
    try:
        run, model, frozen, tokenizer, lora, fingerprint = load_run(args.run)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    base, lora_cfg = run.model.path, run.lora
    if args.format == "peft":
        peft.save_adapter(args.out, lora, lora_cfg, model.config, base)
    elif args.format == "orbax":
        checkpoint.save_adapter_orbax(
            args.out, lora, peft.peft_config_dict(lora_cfg, base), base, fingerprint
        )
    elif args.format == "bnb4bit":
        from qlora_jax.io import hf_export

        quant = run.model.quantization if run.model.quantization.quant_type else Quantization()
        tree = frozen
        if args.merge:  # the adapters folded in once, then requantized layer by layer
            merged = hf_export.merged_weights(frozen, lora, "float32")
            tree = hf_export.requantized(model.config, merged, quant)
        try:
            info = hf_export.save_bnb4bit(args.out, model.config, tree, tokenizer, args.dtype)
        except ValueError as err:
            sys.exit(f"error: {err}")
        print(f"bnb-4bit model: {info['bytes'] / 2**20:.0f} MiB in {info['files']}")
        if args.merge:
            error = hf_export.requantization_error(model.config, merged, quant.block_size)
            print(f"re-quantizing the merged linears to NF4 adds {error:.4f} relative RMS error")
    else:
        from qlora_jax.io import hf_export

        info = hf_export.save_merged(args.out, model.config, frozen, lora, tokenizer, args.dtype)
        print(f"merged model: {info['bytes'] / 2**20:.0f} MiB in {info['files']}")
        if args.requantize_error:
            error = hf_export.requantization_error(
                model.config, hf_export.merged_weights(frozen, lora, "float32")
            )
            print(f"re-quantizing the merged linears to NF4 adds {error:.4f} relative RMS error")
    print(f"wrote {args.format} export to {args.out}")


if __name__ == "__main__":
    main()
