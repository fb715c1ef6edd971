"""What the host link sustains for activation offload: device <-> pinned host copy rates in JAX.

Copies one array of --gib GiB between HBM and pinned host memory (the memory kind XLA's
host-offload remat uses), --repeats times each way, and writes the median GB/s per direction
and size, with the GPU's name, to <out>/pcie_bandwidth.json:
  python experiments/pcie_bandwidth.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def copy_rate(x: jax.Array, sharding: jax.sharding.Sharding, repeats: int) -> float:
    """Median GB/s (1e9 bytes) of copying x to `sharding`."""
    jax.block_until_ready(jax.device_put(x, sharding))  # first copy: allocation, untimed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(x, sharding))
        times.append(time.perf_counter() - start)
    return x.nbytes / float(np.median(times)) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", default="0.0625,0.5,2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    a = p.parse_args()
    device = jax.devices()[0]
    on_device = jax.sharding.SingleDeviceSharding(device)
    on_host = on_device.with_memory_kind("pinned_host")
    rows = []
    for gib in (float(g) for g in a.gib.split(",")):
        x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16, device=on_device)
        to_host = copy_rate(x, on_host, a.repeats)
        x_host = jax.device_put(x, on_host)
        to_device = copy_rate(x_host, on_device, a.repeats)
        rows.append({"gib": gib, "device_to_host_gb_s": to_host, "host_to_device_gb_s": to_device})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pcie_bandwidth.json"), "w") as f:
        json.dump({"gpu": device.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
