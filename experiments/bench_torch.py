"""The PyTorch QLoRA stack on one shape: transformers + peft + bitsandbytes (NF4, double quant),
sdpa attention, gradient checkpointing, PagedAdamW32bit, LoRA on all 7 projections, random tokens.
Prints one JSON line (RESULT {...}, child_runs.report). Called by bench_throughput.py; random bf16
weights are built on the GPU and quantized there, so nothing large travels (shapes too large for
that load a 4-bit checkpoint that bench_models.py writes once per machine)."""

from __future__ import annotations

import bench_models
import bitsandbytes as bnb
import child_runs
import peft
import torch
import torch_steps
import transformers

from qlora_jax.models.config import to_hf_config
from qlora_jax.models.presets import preset


def quantize_linears(model: torch.nn.Module) -> None:
    """Swap every decoder nn.Linear for bnb Linear4bit (NF4 + double quant, bf16 compute, its bias
    kept), in place."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,  # Qwen2's q/k/v
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                        device="meta",
                    )
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                    ).to("cuda")
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, q)
                    del child
        torch.cuda.empty_cache()


def qlora_model(preset_name: str, r: int, model_dir: str) -> torch.nn.Module:
    """The preset's shape with random weights, its linears in NF4, gradient checkpointing on, and
    peft LoRA (alpha 2r) on all 7 projections. The bf16 weights are built on the current GPU and
    quantized there; a shape whose 16-bit weights do not fit it loads bench_models.py's 4-bit
    checkpoint instead (saved under model_dir)."""
    cfg = preset(preset_name)
    torch.manual_seed(0)
    # Gemma 2's attention soft-cap runs only in transformers' eager attention (sdpa would skip it)
    attention = "eager" if cfg.attn_logit_softcapping else "sdpa"
    if bench_models.fits_in_bf16(preset_name, torch.cuda.get_device_properties(0).total_memory):
        hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg), attn_implementation=attention)
        with torch.device("cuda"):  # the preset's family: LlamaForCausalLM, Qwen2ForCausalLM, ...
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(torch.bfloat16)
        quantize_linears(model)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            bench_models.bnb4bit_model(preset_name, model_dir),
            device_map="cuda",
            dtype=torch.bfloat16,
            attn_implementation=attention,
        )
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=torch_steps.PROJECTIONS,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


VERSIONS = {"transformers": transformers.__version__, "peft": peft.__version__}


def main() -> None:
    a = torch_steps.parser().parse_args()
    model = qlora_model(a.preset, a.r, a.model_dir)
    vocab = preset(a.preset).vocab_size
    child_runs.report(torch_steps.time_steps("torch+peft+bnb", model, vocab, a, VERSIONS, autocast=True))


if __name__ == "__main__":
    main()
