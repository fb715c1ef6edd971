"""XLA's memory plan (temporaries of the compiled step) for the scanned layers against the layers
one after another (model.scan_layers=False), per remat policy, on this machine's backend.

Issue 18: the layer-by-layer model makes each offloaded layer input a plain copy, but with no loop
nothing makes a layer's recompute wait for its backward. On CPU its plan with remat is that of no
remat at all; the GPU row of gpu_offload_overlap.sh says whether XLA:GPU does the same. An 8-layer
model, 1,024 wide, 2 x 512 tokens, LoRA r=8 on all linears, XLA attention; written to
$OUT/layer_by_layer_memory.json.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from qlora_jax import lora as lora_lib
from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.train import step as step_lib


def temp_mib(cfg: LlamaConfig, quantization: str | None) -> float:
    _, frozen = llama.random_init(cfg, quantization=quantization, dtype=cfg.dtype)
    lora_cfg = lora_lib.LoraConfig(r=8, target_modules="all-linear")
    tree = lora_lib.init_lora(jax.random.key(0), frozen, cfg, lora_cfg)
    ids = np.zeros((2, 512), np.int32)
    batch = {"inputs": ids, "targets": ids, "loss_mask": np.ones_like(ids, bool)}
    model = llama.Llama(cfg)
    step = jax.jit(lambda t: step_lib.mean_loss_and_grads(model, lora_cfg, t, frozen, batch, None, 1, 256))
    return step.lower(tree).compile().memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    shape = dict(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=8)
    rows = []
    for dtype, quantization in (("bfloat16", "nf4"), ("float32", None)):
        for scan_layers in (True, False):
            for policy in ("none", "full", "offload"):
                cfg = LlamaConfig(
                    **shape,
                    num_kv_heads=2,
                    dtype=dtype,
                    attention_impl="xla",
                    scan_layers=scan_layers,
                    remat_policy=policy,
                )
                row = {
                    "weights": quantization or dtype,
                    "scan_layers": scan_layers,
                    "remat": policy,
                    "temp_mib": round(temp_mib(cfg, quantization), 1),
                }
                print(row, flush=True)
                rows.append(row)
    result = {"backend": jax.default_backend(), "jax": jax.__version__, "shape": shape, "rows": rows}
    with open(
        os.path.join(os.environ.get("OUT", "experiments/results"), "layer_by_layer_memory.json"), "w"
    ) as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
