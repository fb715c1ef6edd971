"""The qlora_jax vs PyTorch study (experiments/compare_pytorch): SmolLM2-135M on GSM8K, sized for CPU.

fp32 dense base and dropout 0 by default, so both frameworks should follow the same trajectory;
the bf16 and NF4 runs override model.dtype / model.quantization (see the study's README).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from smollm2_gsm8k import get_config as gsm8k_config  # noqa: E402


def get_config():
    c = gsm8k_config()
    c.model.quantization = "none"  # fp32 run; "nf4" for the QLoRA run
    c.model.dtype = "float32"  # "bfloat16" for the bf16 run
    c.model.remat_policy = "none"  # 135M params at 2 x 256 tokens: activations are small
    c.lora.dropout = 0.0  # dropout masks cannot match across frameworks
    c.data.max_seq_len = 256  # most GSM8K chat examples fit (~1 per packed row)
    c.train.batch_size = 2  # ~5 s per step for both frameworks together on one free CPU core
    c.train.max_steps = 80  # what a busy 2-core machine finished in the study's session
    c.train.eval_batches = 4  # 8 packed rows of the test split
    c.train.max_new_tokens = 96
    c.optim.warmup_steps = 8
    c.compare.prompts = 3
    c.output_dir = "runs/compare_fp32"
    return c
