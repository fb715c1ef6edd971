"""GPU check: every remat policy gives the loss and LoRA gradients of no remat at all.

On the CPU the offloading policies keep their values on the device (XLA:CPU has no host memory
space), so the CPU tests never run the GPU's host-offload path: dynamic-(update-)slices of a host
stack inside the scanned layers, made asynchronous by XLA's GPU pipeline. openxla/xla#46231 fixed
wrong gradients there (a reversed slice offset when reading offloaded scan residuals back, with
no error). This runs the step's gradient under each policy on a small random NF4 model in float32
with XLA attention, so remat changes only what is recomputed versus kept, and compares with
`none`; the layers scanned and one after another (model.scan_layers=False). A wrong layer's
input read back moves gradients by O(1) of their size; float32 recomputation reorders sums by
~1e-6. The matmuls run at full float32 precision: at the GPU's default (TF32 inputs, 10-bit
mantissas) even `full`, which keeps nothing on the host, differed from `none` by 6e-4 of the
largest gradient (GPU smoke at e9b31f1). Written to $OUT/remat_parity.json.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from attention_parity import SMALL_MODEL, random_model_and_batch

from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.train import step as step_lib

POLICIES = ("full", "offload", "offload_attention", "offload_all")
TOLERANCE = 1e-4  # of the largest gradient: float32 sums in another order, nowhere near a wrong layer


def gradients(cfg: LlamaConfig, frozen, tree, lora_cfg, batch) -> tuple[float, list[np.ndarray]]:
    model = llama.Llama(cfg)
    loss, _, grads = jax.jit(
        lambda t: step_lib.mean_loss_and_grads(model, lora_cfg, t, frozen, batch, None, 1, 256)
    )(tree)
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


def main() -> None:
    cfg = SMALL_MODEL.replace(num_layers=6, dtype="float32", attention_impl="xla")
    frozen, lora_cfg, tree, batch = random_model_and_batch(cfg, rows=2)
    ref_loss, ref = gradients(cfg.replace(remat_policy="none"), frozen, tree, lora_cfg, batch)
    largest = max(float(np.abs(g).max()) for g in ref)
    rows = {}
    # the MLP over sequence tiles (a scan nested in the layers' scan), and the layers one after another
    variants = [(p, {"seq_tile": tile}) for p in POLICIES for tile in (0, 128)]
    variants += [(p, {"scan_layers": False}) for p in POLICIES]
    for policy, runtime in variants:
        loss, got = gradients(cfg.replace(remat_policy=policy, **runtime), frozen, tree, lora_cfg, batch)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True)) / largest
        name = f"{policy}, " + ", ".join(f"{k}={v}" for k, v in runtime.items())
        rows[name] = {
            "loss": loss,
            "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
            "grad_max_diff_over_largest": diff,
            "pass": diff <= TOLERANCE,
        }
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shape": "B=2 T=512 D=512 H=8 KV=2 L=6 float32 NF4, XLA attention, LoRA r=8 all linears",
        "reference": {"policy": "none", "loss": ref_loss},
        "tolerance": TOLERANCE,
        "policies": rows,
        "all_pass": all(r["pass"] for r in rows.values()),
    }
    with open(os.path.join(os.environ.get("OUT", "experiments/results"), "remat_parity.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main()
