"""QLoRA training throughput over mesh layouts (issue 8): one GPU, data parallel, fsdp, ...

Each layout runs in its own process on the first N devices; one JSON line per layout is appended
to <out>/scaling.jsonl: layout, devices, global batch, tokens/s, per-device peak memory, per-device
frozen bytes, seconds from process start to the end of the first step. Random weights of the
preset's shape created on the mesh, each device only its share (NF4 + double quant), LoRA r=16
all-linear, remat `--remat`, AdamW state offloaded (`--offload_state 0`: on device) and split over
the data axis, bf16, random tokens. A layout `4p:data=4` runs as 4 processes of one GPU each
(jax.distributed on one host) instead of one process driving 4 GPUs. `--torch_ddp N` adds the
PyTorch anchor in the same call: transformers + peft + bitsandbytes under DDP on N GPUs
(bench_torch_ddp.py, torchrun). Usage:
  python experiments/bench_scaling.py --preset llama2-7b --per_device_batch 4 --seq 2048 \
      --layouts 1:data=1,2:data=2,2:fsdp=2 --torch_ddp 4 --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import time

STARTED = time.time()  # a child's start, before JAX is imported: start-to-first-step counts it

import child_runs  # noqa: E402
import numpy as np  # noqa: E402
from step_timing import time_train_step  # noqa: E402


def _device_peaks(jax, multihost_utils, mesh) -> list[float]:
    """Peak GiB of every device of the mesh, gathered from all processes (device order)."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    local = np.array([(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30 for d in mine])
    if jax.process_count() > 1:
        local = multihost_utils.process_allgather(local, tiled=True)
    return [float(x) for x in local]


def run_layout(
    preset: str,
    n_devices: int,
    mesh_spec: str,
    per_device_batch: int,
    seq: int,
    r: int,
    steps: int,
    remat: str,
    offload_state: bool,
    processes: tuple[str, int, int] | None = None,
    profile: bool = False,
    gspmd: bool = False,
    scan_layers: bool = True,
):
    import tempfile

    import jax

    if processes:  # (coordinator, count, id): this process drives one GPU of a multi-process mesh
        coordinator, count, process_id = processes
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=count, process_id=process_id
        )
    from jax.experimental import multihost_utils

    from qlora_jax import lora as lora_lib
    from qlora_jax import sharding
    from qlora_jax.models import llama
    from qlora_jax.train import step as step_lib
    from qlora_jax.train.optim import OptimConfig, make_optimizer

    if gspmd:  # the A/B probe: GSPMD's own placement of the gradient sum and the fsdp weights
        step_lib._rank_axes = lambda mesh: ()
        sharding.gathered_rules = lambda mesh: ()
    sizes = dict(kv.split("=") for kv in mesh_spec.split(";"))
    mesh_cfg = sharding.MeshConfig(**{"data": 1} | {k: int(v) for k, v in sizes.items()})
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n_devices])
    model, frozen = llama.random_init(
        preset, quantization="nf4", dtype="bfloat16", remat_policy=remat, scan_layers=scan_layers, mesh=mesh
    )
    load_peaks = _device_peaks(jax, multihost_utils, mesh)
    lora_cfg = lora_lib.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear")
    tree = lora_lib.init_lora(jax.random.key(0), frozen, model.config, lora_cfg)
    lora_shardings = sharding.lora_shardings(mesh, tree)
    tree = sharding.place(tree, lora_shardings)
    load_s = time.time() - STARTED
    optim_cfg = OptimConfig(lr=2e-4, max_grad_norm=0.3, offload_state=offload_state)
    optimizer = make_optimizer(optim_cfg)
    state_shardings = sharding.opt_state_shardings(mesh, jax.eval_shape(optimizer.init, tree))
    state = step_lib.init_opt_state(optimizer, tree, optim_cfg, state_shardings)
    train_step = step_lib.make_train_step(
        model, lora_cfg, optim_cfg, optimizer, state_shardings, 256, lora_shardings
    )
    batch = per_device_batch * mesh.shape["data"] * mesh.shape["fsdp"]
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    data = sharding.shard_batch(
        mesh, {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids, bool)}
    )
    ready_s = time.time() - STARTED
    profile_dir = tempfile.mkdtemp(prefix="bench_scaling_trace_") if profile else ""
    step, metrics, plan = time_train_step(
        train_step, tree, state, frozen, data, steps, profile_dir=profile_dir
    )
    peaks = _device_peaks(jax, multihost_utils, mesh)
    if jax.process_count() > 1:  # no process may leave while another still needs the coordinator
        multihost_utils.sync_global_devices("bench_scaling done")
    return {
        "step_s": step,
        "tokens_per_s": batch * seq / step,
        "global_batch": batch,
        "peak_mem_gib_per_device": peaks,
        "load_peak_gib_per_device": load_peaks,
        "load_s": load_s,
        "start_to_first_step_s": ready_s + plan["compile_s"] + plan["first_step_s"],
        "compile_s": plan["compile_s"],
        "frozen_gib_per_device": sharding.per_device_bytes(frozen) / 2**30,
        "loss": float(metrics["loss"]),
        "jax": jax.__version__,
    } | ({"profile": plan["profile"]} if profile else {})


def run_processes(cmd: list[str], n: int) -> dict:
    """A layout as n processes of one GPU each (jax.distributed on this host): process 0's result."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        coordinator = f"localhost:{s.getsockname()[1]}"
    cpu_devices = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    procs = [
        subprocess.Popen(
            [*cmd, f"--process={coordinator},{n},{i}"],
            env=os.environ
            | {
                "CUDA_VISIBLE_DEVICES": str(i),
                "XLA_FLAGS": cpu_devices,
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    outputs = [p.communicate() for p in procs]
    failed = max(p.returncode for p in procs)  # process 0 reports; any process may fail
    return child_runs.result(failed, outputs[0][0], "\n".join(err[-800:] for _, err in outputs))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--per_device_batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--layouts",
        default="1:data=1,2:data=2,2:fsdp=2",
        help="devices[p]:axis=size;...,  p: one process per device",
    )
    p.add_argument("--remat", default="auto", help="model.remat_policy")
    p.add_argument("--offload_state", type=int, default=1, help="1: AdamW state in pinned host memory")
    p.add_argument("--profile", type=int, default=0, help="1: add each layout's per-device trace breakdown")
    p.add_argument(
        "--label", default="", help="recorded in every row (e.g. the XLA flags of this invocation)"
    )
    p.add_argument(
        "--gspmd", type=int, default=0, help="1: GSPMD places the gradient sum and fsdp weights (A/B)"
    )
    p.add_argument("--scan_layers", type=int, default=1, help="0: layer by layer (model.scan_layers)")
    p.add_argument("--torch_ddp", type=int, default=0, help="GPUs for the PyTorch DDP anchor (0: none)")
    p.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    p.add_argument("--call", default="", help="the call id to record (a call split over commands)")
    p.add_argument("--child", default="", help="internal: one layout to run in this process")
    p.add_argument("--process", default="", help="internal: coordinator,count,id of a multi-process layout")
    a = p.parse_args()
    if a.child:
        n, mesh_spec = a.child.split(":")
        coordinator, count, process_id = a.process.split(",") if a.process else ("", "1", "0")
        result = run_layout(
            a.preset,
            int(n),
            mesh_spec,
            a.per_device_batch,
            a.seq,
            a.r,
            a.steps,
            a.remat,
            bool(a.offload_state),
            (coordinator, int(count), int(process_id)) if a.process else None,
            bool(a.profile),
            bool(a.gspmd),
            bool(a.scan_layers),
        )
        if process_id == "0":
            child_runs.report(result)
        return
    import jax

    gpu, available = jax.devices()[0].device_kind, len(jax.devices())
    call_id = a.call or datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(a.out, exist_ok=True)
    runs = [(layout, int(layout.split(":")[0].rstrip("p"))) for layout in a.layouts.split(",")]
    if a.torch_ddp:
        runs.append((f"torch DDP data={a.torch_ddp}", a.torch_ddp))
    for layout, n in runs:
        if n > available:
            print(f"{layout}: skipped, {available} device(s) here", flush=True)
            continue
        if layout.startswith("torch"):
            experiments = os.path.dirname(os.path.abspath(__file__))
            paths = [os.path.dirname(experiments), experiments, os.environ.get("PYTHONPATH", "")]
            env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                os.path.join(experiments, "bench_torch_ddp.py"),
            ]
            cmd += [f"--preset={a.preset}", f"--batch={a.per_device_batch}", f"--seq={a.seq}"]
            cmd += [f"--lora_rank={a.r}"]  # not --r: torchrun takes it for a prefix of its own options
            row = child_runs.run(cmd, env)
        else:
            cmd = [sys.executable, __file__, "--child", layout.replace("p:", ":")] + [
                f"--{k}={getattr(a, k)}"
                for k in (
                    "preset",
                    "per_device_batch",
                    "seq",
                    "r",
                    "steps",
                    "remat",
                    "offload_state",
                    "profile",
                    "gspmd",
                    "scan_layers",
                )
            ]
            row = (run_processes(cmd, n) if layout.split(":")[0].endswith("p") else child_runs.run(cmd)) | {
                "framework": "qlora_jax",
                "remat": a.remat,
                "offload_state": a.offload_state,
                "placement": "gspmd" if a.gspmd else "ours",
                "scan_layers": bool(a.scan_layers),
            }
        row |= {
            "layout": layout,
            "devices": n,
            "preset": a.preset,
            "per_device_batch": a.per_device_batch,
            "seq": a.seq,
            "rank": a.r,
            "gpu": gpu,
            "date": datetime.date.today().isoformat(),
            "call": call_id,
        } | ({"label": a.label} if a.label else {})
        with open(os.path.join(a.out, "scaling.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            json.dumps(
                {k: row.get(k) for k in ("layout", "tokens_per_s", "peak_mem_gib_per_device", "error")}
            )
        )


if __name__ == "__main__":
    main()
