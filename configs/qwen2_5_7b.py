"""QLoRA paper recipe for qwen2.5-7b: dropout 0.1 and lr 2e-4, the paper's values for 7B models."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qlora_paper import paper_recipe  # noqa: E402


def get_config():
    return paper_recipe("qwen2.5-7b", lora_dropout=0.1, lr=2e-4)
