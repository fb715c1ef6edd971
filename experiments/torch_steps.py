"""What the PyTorch-side benchmarks (bench_torch.py, bench_unsloth.py, bench_torch_ddp.py) share:
their arguments, the LoRA targets, and the timed QLoRA step (PagedAdamW32bit, gradient clipping
0.3, random tokens) with its result row. Imports only torch and bitsandbytes, so Unsloth can still be
imported before transformers."""

from __future__ import annotations

import argparse
import contextlib
import time

import bitsandbytes as bnb
import torch

# every decoder projection of any family (peft targets those a model has: Phi-3's are fused)
PROJECTIONS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--r", "--lora_rank", dest="r", type=int, default=16)  # torchrun: --lora_rank
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model_dir", default=".bench_models", help="saved random models (bench_models.py)")
    return p


def time_steps(
    framework: str,
    model: torch.nn.Module,
    vocab_size: int,
    a: argparse.Namespace,
    versions: dict[str, str],
    autocast: bool,
) -> dict:
    """Train `model` (adapters only) on random tokens: median step time after a.warmup untimed
    steps and peak CUDA memory since the first step, as a result row (child_runs.report). `model`
    may be wrapped in DistributedDataParallel: each process then times its own steps on its own
    batch."""
    opt = bnb.optim.PagedAdamW32bit([q for q in model.parameters() if q.requires_grad], lr=2e-4)
    ids = torch.randint(0, vocab_size, (a.batch, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps + a.warmup):
        torch.cuda.synchronize()
        start = time.perf_counter()
        cast = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with cast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    step = times[len(times) // 2]
    return {
        "framework": framework,
        "step_s": step,
        "tokens_per_s": a.batch * a.seq / step,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
        "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__} | versions,
    }
