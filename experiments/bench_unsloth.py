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

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

import unsloth  # noqa: E402,I001  (must come before transformers)
import child_runs  # noqa: E402
import torch  # noqa: E402
import torch_steps  # noqa: E402
import transformers  # noqa: E402

from qlora_jax.models.config import to_hf_config  # noqa: E402
from qlora_jax.models.presets import preset  # noqa: E402


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
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    with torch.device("cuda"):  # the preset's family: LlamaForCausalLM, Qwen2ForCausalLM, ...
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="4GB")
    word_level_tokenizer(cfg.vocab_size).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def main() -> None:
    p = torch_steps.parser()
    p.add_argument("--model_dir", default=".bench_models")
    a = p.parse_args()
    directory = saved_random_model(a.preset, a.model_dir)
    model, _ = unsloth.FastLanguageModel.from_pretrained(
        directory, max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = unsloth.FastLanguageModel.get_peft_model(
        model,
        r=a.r,
        lora_alpha=2 * a.r,
        lora_dropout=0.0,
        target_modules=torch_steps.PROJECTIONS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
        max_seq_length=a.seq,
    )
    unsloth.FastLanguageModel.for_training(model)
    versions = {"unsloth": unsloth.__version__, "transformers": transformers.__version__}
    row = torch_steps.time_steps("unsloth", model, preset(a.preset).vocab_size, a, versions, autocast=False)
    child_runs.report(row)


if __name__ == "__main__":
    main()
