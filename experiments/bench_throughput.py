"""QLoRA training throughput and memory: qlora_jax, the PyTorch stack (transformers + peft +
bitsandbytes) and Unsloth, same shapes, same call.

Each (framework, shape) runs in its own process; one JSON line per run is appended to
<out>/throughput.jsonl. qlora_jax runs twice: a first process compiles the step into JAX's
persistent compilation cache (its peak, XLA's autotuning included, is the row's
first_compile_peak_gib), then the measured process loads it from there, as every later run of a
user's training does; peak_mem_gib is that process's peak (PyTorch: peak since the first step).
Every side: NF4 + double quant base (random weights of the preset's
shape, quantized on the GPU), LoRA r=16 alpha=32 on all 7 projections, gradient checkpointing
(qlora_jax: --remat; PyTorch: HF's; Unsloth: its "unsloth" offloading mode), AdamW (paged on the
PyTorch sides; offloaded state on qlora_jax where asked), bf16 compute, random tokens. Usage:
  python experiments/bench_throughput.py --shapes smollm2-135m:8x512,llama2-7b:1x2048 \
      --frameworks qlora_jax,torch,unsloth --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import child_runs
import numpy as np
from step_timing import peak_gib, time_train_step

DEFAULT_SHAPES = "smollm2-135m:8x512,llama2-7b:1x2048,llama2-7b:4x2048,llama3-8b:1x2048"
BF16_PEAK_TFLOPS = {"H100": 698.0}  # measured bf16 matmul rate in JAX (issue 7), for the %-of-peak column


def run_jax(
    preset_name: str,
    batch: int,
    seq: int,
    r: int,
    steps: int,
    remat: str,
    offload: bool,
    loss_chunk: int,
    quantization: str,
    seq_tile: int = 0,
    warmup: int = 3,
    dequant_slices: int = 1,
    offload_embeddings: bool = False,
    offload_head: bool = False,
) -> dict:
    import jax

    from qlora_jax import lora as lora_lib
    from qlora_jax import sharding
    from qlora_jax.models import llama
    from qlora_jax.train import step as step_lib
    from qlora_jax.train.embedding_lookup import HostEmbeddingLookup
    from qlora_jax.train.optim import OptimConfig, make_optimizer

    model, frozen = llama.random_init(
        preset_name,
        quantization=None if quantization == "none" else quantization,
        dtype="bfloat16",
        remat_policy=remat,
        seq_tile=seq_tile,
        dequant_slices=dequant_slices,
        offload_embeddings=offload_embeddings,
        offload_head=offload_head,
    )
    lora_cfg = lora_lib.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear")
    tree = lora_lib.init_lora(jax.random.key(0), frozen, model.config, lora_cfg)
    optim_cfg = OptimConfig(lr=2e-4, max_grad_norm=0.3, offload_state=offload)
    optimizer = make_optimizer(optim_cfg)
    shardings = sharding.default_shardings(jax.eval_shape(optimizer.init, tree))
    state = step_lib.init_opt_state(optimizer, tree, optim_cfg, shardings)
    peak_after_init = peak_gib()
    train_step = step_lib.make_train_step(
        model, lora_cfg, optim_cfg, optimizer, shardings if offload else None, chunk_size=loss_chunk
    )
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    # the batch as the training loop feeds it: with the table in host memory, its rows looked up there
    batch_on_host = {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids, bool)}
    data = jax.device_put(HostEmbeddingLookup(frozen)(batch_on_host))
    step, metrics, plan = time_train_step(train_step, tree, state, frozen, data, steps, warmup)
    if metrics is None:  # compile only
        return {"first_compile_peak_gib": plan["peak_after_compile_gib"]}
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "framework": "qlora_jax",
        "step_s": step,
        "tokens_per_s": batch * seq / step,
        "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss": float(metrics["loss"]),
        "offload_state": offload,
        "remat": remat,
        "loss_chunk": loss_chunk,
        "quantization": quantization,
        "seq_tile": seq_tile,
        "dequant_slices": dequant_slices,
        "offload_embeddings": offload_embeddings,
        "offload_head": offload_head,
        "peak_after_init_gib": peak_after_init,
        **plan,
        "versions": {"jax": jax.__version__, "qlora_jax": __import__("qlora_jax").__version__},
    }


def framework_command(framework: str, name: str, batch: int, seq: int, a: argparse.Namespace) -> list[str]:
    """The child process that measures one framework on one shape (its own process: own peak)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if framework == "qlora_jax":
        flags = ("r", "steps", "warmup", "remat", "offload", "loss_chunk", "quantization", "seq_tile")
        flags += ("dequant_slices", "offload_embeddings", "offload_head")
        return [__file__, "--child", f"{name}:{batch}x{seq}", *(f"--{k}={getattr(a, k)}" for k in flags)]
    script = {"torch": "bench_torch.py", "unsloth": "bench_unsloth.py"}[framework]
    cmd = [os.path.join(here, script), f"--preset={name}", f"--batch={batch}", f"--seq={seq}", f"--r={a.r}"]
    cmd += [f"--steps={a.steps}", f"--warmup={a.warmup}"]
    return cmd + [f"--model_dir={a.model_dir}"]


def framework_env(framework: str, a: argparse.Namespace) -> dict[str, str]:
    """The PyTorch sides keep JAX (imported for the presets) off the GPU. qlora_jax may use most of
    the host's memory for offloaded activations (XLA caps its pinned host pool at 64 GiB unless
    told otherwise; long contexts need more) and shares one persistent compilation cache."""
    if framework != "qlora_jax":
        return dict(os.environ) | {"JAX_PLATFORMS": "cpu"}
    host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": str(int(0.85 * host_gib)),
        "JAX_COMPILATION_CACHE_DIR": os.path.abspath(os.path.join(a.model_dir, "jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    } | dict(os.environ)


def run_framework(framework: str, name: str, batch: int, seq: int, a: argparse.Namespace) -> dict:
    """One measured run of a framework on a shape, in its own process (qlora_jax: after a
    compile-only process has filled the compilation cache); {"error": ...} when it failed."""
    cmd, env = framework_command(framework, name, batch, seq, a), framework_env(framework, a)
    first: dict = {}
    if framework == "qlora_jax":
        first = child_runs.run([sys.executable, *cmd, "--steps=0", "--warmup=0"], env)
        if "error" in first:
            return first
    return first | child_runs.run([sys.executable, *cmd], env)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The settings of each run (framework_command passes them on to the child), where rows go."""
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiled before them)")
    p.add_argument("--remat", default="full")
    p.add_argument("--offload", type=int, default=0, help="qlora_jax: optimizer state in pinned host memory")
    p.add_argument("--loss_chunk", type=int, default=1024, help="qlora_jax: tokens per cross-entropy chunk")
    p.add_argument("--quantization", default="nf4", help="qlora_jax: nf4 | none (dense bf16: a ceiling)")
    p.add_argument("--seq_tile", type=int, default=0, help="qlora_jax: MLP sequence tile (0: whole)")
    p.add_argument("--dequant_slices", type=int, default=1, help="qlora_jax: NF4 dequant slices")
    p.add_argument("--offload_embeddings", type=int, default=0, help="qlora_jax: 1: token table on the host")
    p.add_argument("--offload_head", type=int, default=0, help="qlora_jax: 1: output head in host memory")
    p.add_argument("--model_dir", default=".bench_models", help="where random PyTorch-side models are saved")
    p.add_argument("--call", default="", help="call id shared by the rows (default: now)")
    p.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="preset:BxT,... ")
    p.add_argument("--frameworks", default="qlora_jax,torch,unsloth")
    add_run_args(p)
    p.add_argument("--child", default="", help="internal: preset:BxT to run in this process")
    a = p.parse_args()
    if a.child:
        name, shape = a.child.split(":")
        batch, seq = (int(v) for v in shape.split("x"))
        result = run_jax(
            name,
            batch,
            seq,
            a.r,
            a.steps,
            a.remat,
            bool(a.offload),
            a.loss_chunk,
            a.quantization,
            a.seq_tile,
            a.warmup,
            a.dequant_slices,
            bool(a.offload_embeddings),
            bool(a.offload_head),
        )
        child_runs.report(result)
        return
    import jax

    from qlora_jax.models.presets import preset

    gpu = jax.devices()[0].device_kind
    call_id = a.call or datetime.datetime.now().isoformat(timespec="seconds")  # rows of one call share it
    os.makedirs(a.out, exist_ok=True)
    for spec in a.shapes.split(","):
        name, shape = spec.split(":")
        batch, seq = (int(v) for v in shape.split("x"))
        for framework in a.frameworks.split(","):
            row = {"framework": framework} | run_framework(framework, name, batch, seq, a)
            params = preset(name).num_params
            row |= {
                "shape": name,
                "batch": batch,
                "seq": seq,
                "rank": a.r,
                "gpu": gpu,
                "params": params,
                "date": datetime.date.today().isoformat(),
                "call": call_id,
            }
            if "step_s" in row:
                row["tflops_6N"] = 6 * params * batch * seq / row["step_s"] / 1e12
                peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), None)
                row["pct_bf16_peak"] = None if peak is None else 100 * row["tflops_6N"] / peak
            with open(os.path.join(a.out, "throughput.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            summary = {
                k: row.get(k) for k in ("framework", "shape", "batch", "seq", "tokens_per_s", "peak_mem_gib")
            }
            print(
                json.dumps(summary)
                if "error" not in row
                else f"{framework} {spec} FAILED: {row['error'][-600:]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
