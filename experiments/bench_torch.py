"""The PyTorch QLoRA stack on one shape: transformers + peft + bitsandbytes (NF4, double quant),
sdpa attention, gradient checkpointing, PagedAdamW32bit, LoRA on all 7 projections, random tokens.
Prints one JSON line (RESULT {...}, child_runs.report). Called by bench_throughput.py; random bf16
weights are built on the GPU and quantized there, layer by layer, so nothing large travels."""

from __future__ import annotations

import argparse
import time

import bitsandbytes as bnb
import child_runs
import peft
import torch
import transformers

from qlora_jax.models.config import to_hf_config
from qlora_jax.models.presets import preset

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantize_linears(model: torch.nn.Module) -> None:
    """Swap every decoder nn.Linear for bnb Linear4bit (NF4 + double quant, bf16 compute), in place."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=False,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                        device="meta",
                    )
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                    ).to("cuda")
                    setattr(parent, name, q)
                    del child
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    cfg = preset(a.preset)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa")
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    quantize_linears(model)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = peft.LoraConfig(
        r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, lora)
    opt = bnb.optim.PagedAdamW32bit([q for q in model.parameters() if q.requires_grad], lr=2e-4)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps + a.warmup):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
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
    child_runs.report(
        {
            "framework": "torch+peft+bnb",
            "step_s": step,
            "tokens_per_s": a.batch * a.seq / step,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "bitsandbytes": bnb.__version__,
            },
        }
    )


if __name__ == "__main__":
    main()
