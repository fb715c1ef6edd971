"""Device peak memory and step time of QLoRA training on a 7B-shape model, optimizer state on the
device vs offloaded to pinned host memory (OptimConfig.offload_state).

Each setting runs in its own process (peak memory statistics are per process). Random NF4 base of
the preset's shape built on the device, LoRA on all linears, AdamW, bf16 compute.
Usage: python experiments/offload_benchmark.py [--preset llama2-7b --shapes 4x1024,8x2048 --r 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import child_runs
import numpy as np


def child(args: argparse.Namespace) -> dict:
    import jax

    from qlora_jax import lora as lora_lib
    from qlora_jax import sharding
    from qlora_jax.models import llama
    from qlora_jax.train import step as step_lib
    from qlora_jax.train.optim import OptimConfig, make_optimizer

    model, frozen = llama.random_init(
        args.preset, quantization="nf4", dtype="bfloat16", remat_policy=args.remat
    )
    lora_cfg = lora_lib.LoraConfig(r=args.r, alpha=16, target_modules="all-linear")
    tree = lora_lib.init_lora(jax.random.key(0), frozen, model.config, lora_cfg)
    optim_cfg = OptimConfig(lr=2e-4, max_grad_norm=0.3, offload_state=args.offload)
    optimizer = make_optimizer(optim_cfg)
    shardings = sharding.default_shardings(jax.eval_shape(optimizer.init, tree))
    state = step_lib.init_opt_state(optimizer, tree, optim_cfg, shardings)
    train_step = step_lib.make_train_step(
        model, lora_cfg, optim_cfg, optimizer, shardings if args.offload else None
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = jax.device_put(
        {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids, bool)}
    )
    device = jax.devices()[0]
    after_init = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)  # CPU keeps no statistics
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        tree, state, metrics = train_step(tree, state, frozen, batch, None)
        jax.block_until_ready((tree, state, metrics))
        if i >= 2:  # the first two include compilation
            times.append(time.perf_counter() - start)
    stats = device.memory_stats() or {"peak_bytes_in_use": 0}
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    return {
        "offload_state": args.offload,
        "peak_device_bytes": stats["peak_bytes_in_use"],
        "peak_device_bytes_after_init": after_init,
        "frozen_bytes": nbytes(frozen),
        "lora_bytes": nbytes(tree),
        "opt_state_bytes": nbytes(state),
        "opt_state_memory_kinds": sorted({x.sharding.memory_kind for x in jax.tree.leaves(state)}),
        "step_seconds_median": float(np.median(times)),
        "step_seconds_all": times,
        "tokens_per_second": args.batch * args.seq / float(np.median(times)),
        "loss_last": float(metrics["loss"]),
        "trainable": lora_lib.trainable_parameters_line(model.config, lora_cfg),
        "attention": llama.attention_implementation(model.config, jax.numpy.bfloat16, None),
        "device": device.device_kind,
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--shapes", default="4x1024,8x2048", help="comma-separated batch x sequence length")
    parser.add_argument("--batch", type=int, default=4, help="internal: the child's batch")
    parser.add_argument("--seq", type=int, default=1024, help="internal: the child's sequence length")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--offload", type=int, default=None, help="internal: run one setting")
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "experiments/results"), "offload_benchmark.json")
    )
    args = parser.parse_args()
    if args.offload is not None:
        child_runs.report(child(args))
        return
    comparisons = []
    for shape in args.shapes.split(","):
        args.batch, args.seq = (int(v) for v in shape.split("x"))
        runs = []
        for offload in (0, 1):
            cmd = [sys.executable, __file__, "--offload", str(offload)] + [
                f"--{k}={getattr(args, k)}" for k in ("preset", "batch", "seq", "r", "remat", "steps")
            ]
            result = child_runs.run(cmd)
            if "error" in result:
                sys.exit(result["error"])
            runs.append(result)
        on, off = runs
        comparisons.append(
            {
                "batch": args.batch,
                "seq": args.seq,
                "runs": runs,
                "peak_saved_bytes": on["peak_device_bytes"] - off["peak_device_bytes"],
                "step_time_overhead": off["step_seconds_median"] / on["step_seconds_median"] - 1,
            }
        )
    summary = {
        "setup": {k: getattr(args, k) for k in ("preset", "r", "remat", "steps")}
        | {"lora_alpha": 16, "target_modules": "all-linear", "quantization": "nf4+dq", "compute": "bf16"},
        "comparisons": comparisons,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    gib = 2**30
    for c in comparisons:
        for r in c["runs"]:
            peak = r["peak_device_bytes"] / gib
            print(
                f"{c['batch']}x{c['seq']} offload={r['offload_state']}: peak {peak:.2f} GiB, "
                f"opt state {r['opt_state_bytes'] / gib:.2f} GiB in {r['opt_state_memory_kinds']}, "
                f"step {r['step_seconds_median'] * 1e3:.0f} ms, {r['tokens_per_second']:.0f} tok/s"
            )
        saved, overhead = c["peak_saved_bytes"] / gib, 100 * c["step_time_overhead"]
        print(f"{c['batch']}x{c['seq']}: saved {saved:.2f} GiB, step-time overhead {overhead:.1f}%")


if __name__ == "__main__":
    main()
