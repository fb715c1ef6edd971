"""Sharded training through `python -m qlora_jax.train`: two processes joined by jax.distributed
on a data x fsdp x tensor mesh of 8 CPU devices give the losses of a one-device run.
(In a file of its own so that xdist's --dist loadfile runs it beside tests/test_sharding.py.)"""

from __future__ import annotations

import os
import socket

import jax
import numpy as np
import pytest

from qlora_jax.train.metrics import read_metrics
from tests.conftest import cli_env, start_cli, tiny_run_overrides, train_command

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")


def _cli(tiny_model, run_dir, *overrides, devices: int = 1, env_extra=None):
    env = cli_env() | (env_extra or {})
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    args = tiny_run_overrides(tiny_model, str(run_dir), 4) + ["--config.lora.dropout=0.0", *overrides]
    return start_cli(train_command(*args), env)


def _losses(run_dir, *processes) -> list[float]:
    for p in processes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


BATCH = "--config.train.batch_size=4"


@pytest.fixture(scope="module")
def one_device_cli_losses(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    losses = _losses(run_dir, _cli(tiny_model, run_dir, BATCH))
    assert len(losses) == 4
    return losses


# the demo recipe computes in float32, so the cross-device sum order is the only difference from
# one device: rtol 1e-4 over 4 steps (observed ~1e-7)


def test_two_processes_on_a_data_fsdp_tensor_mesh_train_like_one_device(
    tiny_model, tmp_path, one_device_cli_losses
):
    """Two CLI processes of 4 CPU devices each, joined by jax.distributed (gloo collectives) into
    one 2 x 2 x 2 data x fsdp x tensor mesh: the losses of a one-device run, one set of run files,
    collective checkpoints. The tied token table in host memory (model.offload_head; the one-device
    run keeps it on the device): each process gathers it whole and looks its batches' rows up."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [
        _cli(
            tiny_model,
            tmp_path,
            BATCH,
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2",
            "--config.checkpoint.every=2",
            "--config.model.offload_head=True",
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            devices=4,
            env_extra={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"},
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(_losses(tmp_path, *processes), one_device_cli_losses, rtol=1e-4)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    for name in ("summary.json", "adapter/adapter_model.safetensors", "adapter/orbax"):
        assert (tmp_path / name).exists(), name
