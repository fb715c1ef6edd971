"""The QLoRA paper's recipe (Dettmers et al. 2023, arXiv:2305.14314, Appendix B and the qlora repo's
scripts/finetune_guanaco_*.sh), shared by the llama2_7b / llama3_8b / llama2_70b / qwen2_5_7b /
qwen3_8b / phi3_mini / gemma2_9b / gemma3_12b / gpt2 recipe files.

model.path defaults to the preset's shape with random weights (benchmarks); point it at a HF
directory of the real checkpoint to fine-tune it, and data.train_path at an instruction dataset.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402


def paper_recipe(preset: str, lora_dropout: float, lr: float):
    c = base_config()
    c.model.path = preset  # or the HF checkpoint directory
    c.model.tokenizer = ""  # the checkpoint's tokenizer (required when model.path is a preset)
    c.model.quantization = "nf4"  # paper: NF4 storage
    c.model.double_quant = True  # paper: double quantization
    c.model.dtype = "bfloat16"  # paper: bf16 compute
    c.model.remat_policy = "full"  # paper: gradient checkpointing
    c.lora.r = 64  # paper App. B: r=64
    c.lora.alpha = 16.0  # paper App. B: alpha=16
    c.lora.dropout = lora_dropout  # paper App. B: 0.1 up to 13B, 0.05 for 33B and 65B
    c.lora.target_modules = "all-linear"  # paper: LoRA on all linear layers
    c.data.format = "alpaca"  # paper's main datasets are instruction/response
    c.data.max_seq_len = 512  # paper: source 384 + target 128 for most datasets
    c.data.packing = False  # paper: group_by_length, i.e. length buckets, no packing
    c.train.batch_size = 16  # guanaco scripts: batch 1 x 16 accumulation steps = 16 sequences
    c.train.max_steps = 1875  # guanaco scripts: --max_steps 1875 (OASST1)
    c.optim.lr = lr  # paper App. B: 2e-4 for 7B/13B, 1e-4 for 33B/65B
    c.optim.schedule = "constant"  # paper: constant schedule
    c.optim.warmup_steps = 0  # guanaco scripts pass --warmup_ratio 0.03, which HF ignores for "constant"
    c.optim.max_grad_norm = 0.3  # paper: max grad norm 0.3
    c.optim.weight_decay = 0.0
    c.optim.offload_state = True  # paper: paged AdamW; here the state lives in pinned host memory
    c.checkpoint.every = 250
    c.output_dir = f"runs/{preset}"
    return c
