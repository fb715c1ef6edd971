"""Unsloth on one shape: FastLanguageModel (NF4 + double quant via bitsandbytes), LoRA on all 7
projections, its recommended `use_gradient_checkpointing="unsloth"` (activations offloaded to
host), PagedAdamW32bit as in bench_torch.py, random tokens. Prints one JSON line (RESULT {...},
child_runs.report); called by bench_throughput.py and bench_context.py.

Unsloth loads only from a directory, so the first run of a preset saves random bf16 weights
(built on the GPU) plus a word-level tokenizer of the preset's vocabulary under --model_dir; later
runs on the same machine reuse it. Start it as Unsloth asks: imported before transformers, with
HF_HUB_OFFLINE=1 and UNSLOTH_DISABLE_STATISTICS=1 (set below before the import).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

import unsloth  # noqa: E402,I001  (must come before transformers)
import bitsandbytes as bnb  # noqa: E402
import child_runs  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from qlora_jax.models.config import to_hf_config  # noqa: E402
from qlora_jax.models.presets import preset  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def word_level_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary matches the model's embedding rows exactly (tokens t0..tV-1)."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t0"
    )


def saved_random_model(name: str, root: str) -> str:
    """A directory holding a random bf16 model of the preset's shape and a matching tokenizer."""
    directory = os.path.join(root, name)
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    cfg = preset(name)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg))
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="4GB")
    word_level_tokenizer(cfg.vocab_size).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model_dir", default=".bench_models")
    a = p.parse_args()
    cfg = preset(a.preset)
    directory = saved_random_model(a.preset, a.model_dir)
    model, _ = unsloth.FastLanguageModel.from_pretrained(
        directory, max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = unsloth.FastLanguageModel.get_peft_model(
        model,
        r=a.r,
        lora_alpha=2 * a.r,
        lora_dropout=0.0,
        target_modules=PROJECTIONS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
        max_seq_length=a.seq,
    )
    unsloth.FastLanguageModel.for_training(model)
    opt = bnb.optim.PagedAdamW32bit([q for q in model.parameters() if q.requires_grad], lr=2e-4)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps + a.warmup):
        torch.cuda.synchronize()
        start = time.perf_counter()
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
            "framework": "unsloth",
            "step_s": step,
            "tokens_per_s": a.batch * a.seq / step,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss),
            "versions": {
                "unsloth": unsloth.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "bitsandbytes": bnb.__version__,
            },
        }
    )


if __name__ == "__main__":
    main()
