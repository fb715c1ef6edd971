"""QLoRA paper recipe for gemma-2-9b: dropout 0.1 and lr 2e-4, the paper's values up to 13B (bf16
compute, as Gemma 2 was trained)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qlora_paper import paper_recipe  # noqa: E402


def get_config():
    return paper_recipe("gemma-2-9b", lora_dropout=0.1, lr=2e-4)
