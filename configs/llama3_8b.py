"""QLoRA paper recipe (Dettmers et al. 2023, arXiv:2305.14314, Appendix B) for llama3-8b.

model.path defaults to the preset's shape with random weights (benchmarks); point it at a HF
directory of the real checkpoint to fine-tune it, and data.train_path at an instruction dataset.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.path = "llama3-8b"  # or the HF checkpoint directory
    c.model.tokenizer = ""  # the checkpoint's tokenizer (required when model.path is a preset)
    c.model.quantization = "nf4"  # paper: NF4 storage
    c.model.double_quant = True  # paper: double quantization
    c.model.dtype = "bfloat16"  # paper: bf16 compute
    c.model.remat_policy = "full"  # paper: gradient checkpointing
    c.lora.r = 64  # paper App. B: r=64
    c.lora.alpha = 16.0  # paper App. B: alpha=16
    c.lora.dropout = 0.1  # paper App. B: 0.1 up to 13B, 0.05 for 33B and 65B (8B sits with 7B)
    c.lora.target_modules = "all-linear"  # paper: LoRA on all linear layers
    c.data.format = "alpaca"  # paper's main datasets are instruction/response
    c.data.max_seq_len = 512  # paper: source 384 + target 128 for most datasets
    c.data.packing = False  # paper: group_by_length, i.e. length buckets, no packing
    c.train.batch_size = 16  # guanaco scripts: batch 1 x 16 accumulation steps = 16 sequences
    c.train.max_steps = 1875  # qlora repo scripts/finetune_guanaco_*.sh: --max_steps 1875 (OASST1)
    c.optim.lr = 2e-4  # paper App. B: 2e-4 for 7B/13B, 1e-4 for 33B/65B
    c.optim.schedule = "constant"  # paper: constant schedule
    c.optim.warmup_steps = 0  # guanaco scripts pass --warmup_ratio 0.03, which HF ignores for "constant"
    c.optim.max_grad_norm = 0.3  # paper: max grad norm 0.3
    c.optim.weight_decay = 0.0
    c.optim.offload_state = True  # paper: paged AdamW; here the state lives in pinned host memory
    c.checkpoint.every = 250
    c.output_dir = "runs/llama3_8b"
    return c
