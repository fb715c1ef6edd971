"""SmolLM2-135M-Instruct (NF4) on GSM8K, the HF dataset openai/gsm8k (config main) through `datasets`.

Offline, from local files: --config.data.train_path=gsm8k/train.jsonl
--config.data.eval_path=gsm8k/test.jsonl
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.path = ""  # the embedded SmolLM2-135M-Instruct
    c.data.train_path = "openai/gsm8k:main:train"  # HF dataset NAME:CONFIG:SPLIT, or a local .jsonl
    c.data.eval_path = "openai/gsm8k:main:test"  # question / answer rows
    c.data.format = "chat"  # the Instruct model's chat template, loss on the answer only
    c.data.prompt_key = "question"
    c.data.completion_key = "answer"
    c.data.max_seq_len = 512
    c.train.batch_size = 8
    c.train.max_steps = 500
    c.train.eval_every = 100
    c.train.eval_batches = 10
    c.train.exact_match_examples = 50
    c.train.exact_match = "last_number"  # GSM8K answers end with "#### <number>"
    c.train.max_new_tokens = 256
    c.optim.lr = 2e-4  # QLoRA paper's lr for small models
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 20
    c.output_dir = "runs/smollm2_gsm8k"
    return c
