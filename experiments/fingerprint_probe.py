"""Is the NF4 base bit-identical across processes on this machine? (issue 16, item 3)

Runs fresh processes per variant, one per XLA_FLAGS setting in `--xla_flags` (the compiler's
choices, e.g. autotuning, may change a reduction's order); each builds the base (random init of a preset, or
a load of an HF directory) and hashes every leaf in full. Variants: the shipped quantizer, and
with --old_offset the double-quant offset taken by `jnp.mean` as before the fix. Prints which
leaves differ between processes and writes the hashes as JSON.

  python experiments/fingerprint_probe.py --model llama2-7b --out probe.json \
      --xla_flags ",,--xla_gpu_autotune_level=0,--xla_gpu_deterministic_ops=true"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys


def leaf_hashes(model: str, old_offset: bool) -> dict[str, str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.io import checkpoint
    from qlora_jax.models import llama
    from qlora_jax.models.presets import PRESETS
    from qlora_jax.quant import nf4

    if old_offset:
        nf4.fixed_order_mean = jnp.mean
    if model in PRESETS:
        m, frozen = llama.random_init(model, "nf4", seed=0)
    else:
        m, frozen = llama.from_pretrained(model, "nf4")
    out = {"fingerprint": checkpoint.base_fingerprint(m.config, frozen)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(frozen):
        out[jax.tree_util.keystr(path)] = hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest()[:16]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama2-7b", help="preset name or HF directory")
    p.add_argument("--xla_flags", default=",,", help="comma-separated XLA_FLAGS, one process each")
    p.add_argument("--old_offset", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(leaf_hashes(a.model, a.old_offset)))
        return
    report = {}
    for old in (True, False):
        name = "jnp.mean offset (before)" if old else "fixed_order_mean offset (shipped)"
        runs = []
        for flags in a.xla_flags.split(","):
            cmd = [sys.executable, __file__, "--child", "--model", a.model] + (["--old_offset"] * old)
            env = os.environ | {"XLA_FLAGS": flags}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        differing = sorted(k for k in runs[0] if len({r[k] for r in runs}) > 1)
        fingerprints = [r["fingerprint"][:12] for r in runs]
        report[name] = {
            "xla_flags": a.xla_flags.split(","),
            "fingerprints": fingerprints,
            "differing_leaves": differing,
        }
        print(f"{name}: fingerprints {fingerprints}; leaves differing: {differing or 'none'}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "variants": report}, f, indent=2)


if __name__ == "__main__":
    main()
