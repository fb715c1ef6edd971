"""QLoRA paper recipe for gemma-3-12b (the text decoder): dropout 0.1 and lr 2e-4, the paper's
values up to 13B. model.path may name a multimodal Gemma 3 checkpoint: its text decoder loads."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qlora_paper import paper_recipe  # noqa: E402


def get_config():
    return paper_recipe("gemma-3-12b", lora_dropout=0.1, lr=2e-4)
