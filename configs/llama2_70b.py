"""QLoRA paper recipe for llama2-70b: dropout 0.05 and lr 1e-4, the paper's values above 13B."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qlora_paper import paper_recipe  # noqa: E402


def get_config():
    return paper_recipe("llama2-70b", lora_dropout=0.05, lr=1e-4)
