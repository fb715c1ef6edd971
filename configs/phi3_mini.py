"""QLoRA paper recipe for phi-3-mini (3.8B): dropout 0.1 and lr 2e-4, the paper's values up to 13B.

"all-linear" puts one adapter on each of Phi-3's fused projections (qkv_proj, o_proj, gate_up_proj,
down_proj), as peft does; max_seq_len 512 stays inside Phi-3-mini-4k's 2,047-token sliding window.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qlora_paper import paper_recipe  # noqa: E402


def get_config():
    return paper_recipe("phi-3-mini", lora_dropout=0.1, lr=2e-4)
