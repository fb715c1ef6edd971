"""Random models of a preset's shape for the PyTorch-side benchmarks (bench_unsloth.py,
bench_torch.py), saved once per machine under a model directory.

Two kinds: a bf16 checkpoint that Unsloth quantizes as it loads (built by torch on the GPU, the
way every row up to 8B was measured), and, for shapes whose 16-bit weights do not fit the GPU
(llama2-70b: 138 GB), a bitsandbytes 4-bit checkpoint (NF4 + double quant) written by
qlora_jax itself, which Unsloth and transformers load as it is (37 GB for the 70B). Both come with
a word-level tokenizer of the preset's vocabulary.

  python experiments/bench_models.py PRESET DIRECTORY   # the 4-bit checkpoint (its own process:
                                                        # JAX's GPU memory goes when it exits)
"""

from __future__ import annotations

import os
import subprocess
import sys

import transformers

from qlora_jax.models.config import to_hf_config
from qlora_jax.models.frozen import linear_shapes
from qlora_jax.models.presets import preset

# the 16-bit weights must leave this share of the GPU for the step (else the 4-bit checkpoint)
BF16_SHARE_OF_GPU = 0.5


def word_level_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary matches the model's embedding rows exactly (tokens t0..tV-1)."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t0"
    )


def fits_in_bf16(name: str, gpu_bytes: int) -> bool:
    """Whether the preset's bf16 weights (its linears and tables) fit BF16_SHARE_OF_GPU of a GPU
    of `gpu_bytes`."""
    cfg = preset(name)
    linears = sum(rows * cols for rows, cols in linear_shapes(cfg).values()) * cfg.num_layers
    tables = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return 2 * (linears + tables) <= BF16_SHARE_OF_GPU * gpu_bytes


def bf16_model(name: str, root: str) -> str:
    """A directory holding a random bf16 model of the preset's shape (built by torch on the GPU)."""
    import torch

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


def bnb4bit_model(name: str, root: str) -> str:
    """A directory holding a random bitsandbytes 4-bit model of the preset's shape, written by a
    process of its own (this one may hold torch's CUDA context)."""
    directory = os.path.join(root, f"{name}-bnb4bit")
    if not os.path.exists(os.path.join(directory, "config.json")):
        # on the GPU, although the PyTorch benches keep their own JAX (presets only) on the CPU
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # beside the caller's CUDA context
        subprocess.run([sys.executable, os.path.abspath(__file__), name, directory], check=True, env=env)
    return directory


def write_bnb4bit(name: str, directory: str) -> None:
    """qlora_jax's random NF4 base of the preset (built and quantized on the device), written in
    the bitsandbytes format with 16-bit tables."""
    from qlora_jax.io import hf_export
    from qlora_jax.models import llama

    model, frozen = llama.random_init(name, quantization="nf4", dtype="bfloat16")
    tokenizer = word_level_tokenizer(model.config.vocab_size)
    hf_export.save_bnb4bit(directory, model.config, frozen, tokenizer, "bfloat16")


if __name__ == "__main__":
    write_bnb4bit(sys.argv[1], sys.argv[2])
