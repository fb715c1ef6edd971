"""QLoRA paper recipe for gpt2 (GPT-2 small, 124M): dropout 0.1 and lr 2e-4, the paper's values up to 13B.

Fine-tune the real model with --config.model.path=<HF directory of openai-community/gpt2> (or its
GGUF file); its 1,024 learned positions bound data.max_seq_len.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qlora_paper import paper_recipe  # noqa: E402


def get_config():
    return paper_recipe("gpt2", lora_dropout=0.1, lr=2e-4)
