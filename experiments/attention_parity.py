"""GPU check: cuDNN flash attention (the default for causal bf16 on GPU) vs XLA attention, logits and
LoRA gradients of a small random model; then packed rows (several examples per row, padding after)
on cuDNN's packed attention vs XLA's segment mask, loss and LoRA gradients. Written to
$OUT/attention_parity.json."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from qlora_jax import lora as lora_lib
from qlora_jax.data import packing
from qlora_jax.data.formats import Example
from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.train import step as step_lib

# the small random model of the GPU parity checks (remat_parity.py changes its depth and dtype)
SMALL_MODEL = LlamaConfig(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1024,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    dtype="bfloat16",
)


def random_model_and_batch(cfg: LlamaConfig, rows: int) -> tuple:
    """(frozen, lora_cfg, adapters, batch): a random NF4 model of `cfg` in its dtype, LoRA r=8 on
    all linears with B moved off zero (so every adapter matrix gets a gradient), and `rows` rows
    of 512 random tokens."""
    _, frozen = llama.random_init(cfg, quantization="nf4", dtype=cfg.dtype)
    lora_cfg = lora_lib.LoraConfig(r=8, alpha=16, target_modules="all-linear")
    tree = lora_lib.init_lora(jax.random.key(0), frozen, cfg, lora_cfg)
    tree = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.01 if p[-1].key == "b" else x, tree)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, 512)).astype(np.int32)
    batch = {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids, bool)}
    return frozen, lora_cfg, tree, batch


def main() -> None:
    cfg = SMALL_MODEL
    frozen, lora_cfg, tree, batch = random_model_and_batch(cfg, rows=4)
    ids = batch["inputs"]
    out = {}
    for impl in ("cudnn", "xla"):
        model = llama.Llama(cfg.replace(attention_impl=impl))
        logits = np.asarray(jax.jit(model.apply)(frozen, tree, ids))
        loss, _, grads = jax.jit(
            lambda t, m=model: step_lib.mean_loss_and_grads(m, lora_cfg, t, frozen, batch, None, 1, 1024)
        )(tree)
        out[impl] = (logits, float(loss), jax.tree.map(np.asarray, grads))
    (l1, loss1, g1), (l2, loss2, g2) = out["cudnn"], out["xla"]
    grad_rel = max(
        float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
    )
    result = {
        "packed_rows": packed_rows(cfg, frozen, tree, lora_cfg),
        "device": jax.devices()[0].device_kind,
        "default_impl_on_this_backend": llama.attention_implementation(cfg, jax.numpy.bfloat16, None),
        "logits_max_abs_diff_over_max": float(np.abs(l1 - l2).max() / np.abs(l2).max()),
        "argmax_agreement": float((l1.argmax(-1) == l2.argmax(-1)).mean()),
        "loss_cudnn": loss1,
        "loss_xla": loss2,
        "lora_grad_max_rel_diff": grad_rel,
        "shape": "B=4 T=512 D=512 H=8 KV=2 L=4 bf16 NF4",
    }
    with open(os.path.join(os.environ.get("OUT", "experiments/results"), "attention_parity.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def packed_rows(cfg, frozen, tree, lora_cfg) -> dict:
    """Loss and LoRA gradients of packed GSM8K-sized rows: the packed kernel against the mask."""
    rng = np.random.default_rng(1)
    examples = [
        Example(list(rng.integers(0, 1024, n)), [i >= 20 for i in range(n)])
        for n in rng.integers(60, 200, 40)
    ]
    batch = packing.stack(packing.pack(examples, seq_len=512)[:4])
    out = {}
    for impl in ("cudnn", "xla"):
        model = llama.Llama(cfg.replace(attention_impl=impl))
        loss, _, grads = jax.jit(
            lambda t, m=model: step_lib.mean_loss_and_grads(m, lora_cfg, t, frozen, batch, None, 1, 1024)
        )(tree)
        out[impl] = (float(loss), jax.tree.map(np.asarray, grads))
    (loss1, g1), (loss2, g2) = out["cudnn"], out["xla"]
    return {
        "segments_per_row": [int(r.max()) for r in batch["segment_ids"]],
        "loss_cudnn_packed": loss1,
        "loss_xla_mask": loss2,
        "lora_grad_max_rel_diff": max(
            float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
        ),
    }


if __name__ == "__main__":
    main()
