"""Does an async Orbax save survive the next step donating the saved arrays? (issue 16, item 1)

A jitted step donates a tree with one leaf in device memory and one in pinned host memory (as the
offloaded AdamW state), saving after every step. `--raw` saves the live arrays as main did before
the fix; the default goes through TrainCheckpoints.save. Prints ok or the error.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from qlora_jax.io import checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--raw", action="store_true")
    p.add_argument("--memory", default="pinned_host", help="memory kind of the optimizer-state leaf")
    a = p.parse_args()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state_sharding = device.with_memory_kind(a.memory)
    lora = {"a": jnp.ones((2048, 2048))}
    state = {"m": jax.device_put(jnp.zeros((2048, 2048)), state_sharding)}
    step = jax.jit(
        lambda x, s: (jax.tree.map(lambda v: v + 1, x), jax.tree.map(lambda v: v + 1, s)),
        donate_argnums=(0, 1),
        out_shardings=({"a": device}, {"m": state_sharding}),
    )
    ckpts = checkpoint.TrainCheckpoints(tempfile.mkdtemp() + "/c", keep=2)
    how = f"{'raw' if a.raw else 'TrainCheckpoints'} save, state in {a.memory}"
    try:
        for i in range(1, 5):
            lora, state = step(lora, state)
            if a.raw:
                save = ocp.args.StandardSave
                ckpts.manager.save(i, args=ocp.args.Composite(lora=save(lora), opt_state=save(state)))
            else:
                ckpts.save(i, {"lora": lora, "opt_state": state}, {"step": i})
        ckpts.wait()
        print(f"{how}: ok, value {float(state['m'][0, 0])}")
    except Exception as err:  # noqa: BLE001 - the probe reports whatever the runtime raises
        print(f"{how}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)


if __name__ == "__main__":
    main()
