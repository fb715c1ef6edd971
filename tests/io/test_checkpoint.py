"""Exact resume, crash safety and clean stops, with real training subprocesses on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import run_cli, start_cli, tiny_run_overrides, train_command


def _run(*args: str) -> subprocess.CompletedProcess:
    out = run_cli(train_command(*args))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _adapter(run_dir) -> dict[str, np.ndarray]:
    from qlora_jax.io.safetensors_stream import SafetensorsFile

    f = SafetensorsFile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    return {name: f.read(name) for name in f.names()}


def test_resume_from_the_middle_gives_the_same_losses_and_adapter(tiny_model, tiny_run, tmp_path):
    straight, resumed = tiny_run, tmp_path / "resumed"  # tiny_run: 6 steps, checkpoints at 3 and 6
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if the run had died after step 3's checkpoint
    shutil.rmtree(resumed / "adapter")
    out = _run(
        *tiny_run_overrides(tiny_model, resumed, 6), "--config.checkpoint.every=3", "--config.resume=auto"
    )
    assert "resumed from step 3" in out.stdout
    # same compiled step, same batches, same dropout keys: identical on CPU (bound 1e-6)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-6)
    for name, value in _adapter(straight).items():
        np.testing.assert_allclose(_adapter(resumed)[name], value, rtol=1e-6, atol=1e-9)


def test_resume_refuses_a_different_base(other_tiny_model, tiny_run, tmp_path):
    """Same architecture, other weights: only the base fingerprint tells them apart."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = run_cli(train_command(*tiny_run_overrides(other_tiny_model, run, 8), "--config.resume=auto"))
    assert out.returncode != 0 and "refusing to resume" in out.stderr


def _start(run_dir, model, steps: int, every: int):
    return start_cli(
        train_command(*tiny_run_overrides(model, run_dir, steps), f"--config.checkpoint.every={every}")
    )


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("moment", ["mid-save", "between-saves"])
def test_sigkill_at_any_moment_leaves_a_resumable_checkpoint(tiny_model, tmp_path, moment):
    run = tmp_path / "run"
    proc = _start(run, tiny_model, 400, every=1)
    ckpts = run / "checkpoints"

    def saving() -> bool:  # orbax writes into a temporary directory, renamed when complete
        names = os.listdir(ckpts) if ckpts.exists() else []
        complete = [n for n in names if n.isdigit()]
        return len(complete) >= 2 and (moment != "mid-save" or any("tmp" in n for n in names))

    _wait_for(saving, proc)
    proc.kill()
    proc.wait()
    complete = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    # on to at least 2 steps past the last checkpoint; to step 6 (tiny_run's length: the schedule's
    # length is compiled into the step, so tiny_run's compiled step serves) when that is far enough
    steps = max(6, complete[-1] + 2)
    out = _run(
        *tiny_run_overrides(tiny_model, run, steps),
        "--config.checkpoint.every=1",
        "--config.resume=auto",
    )
    resumed_from = int(out.stdout.split("resumed from step ")[1].split()[0])
    assert resumed_from in complete  # the newest checkpoint that was complete when killed (or the one before)
    assert sorted(_losses(run)) == list(range(1, steps + 1))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, tiny_model, 400, every=1000)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(_losses(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = int(stdout.split("after step ")[1].split(";")[0])
    assert (run / "checkpoints" / str(stopped)).is_dir()


def test_relative_checkpoint_directories_work(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from qlora_jax.io.checkpoint import TrainCheckpoints

    monkeypatch.chdir(tmp_path)
    ckpts = TrainCheckpoints("runs/x/checkpoints", keep=2)
    lora, state = {"a": jnp.arange(4.0)}, {"m": jnp.ones(3)}
    ckpts.save(5, {"lora": lora, "opt_state": state}, {"step": 5})
    ckpts.wait()
    restored_state, record = ckpts.restore(5, {"lora": lora, "opt_state": state})
    restored = restored_state["lora"]
    assert record == {"step": 5} and float(restored["a"][3]) == 3.0
    assert (tmp_path / "runs" / "x" / "checkpoints" / "5").is_dir()


def test_save_copies_host_memory_arrays_so_the_next_step_may_donate_them(tmp_path):
    """Orbax keeps a zero-copy view of a host-memory array until its background write ends; the
    next step donating it failed on the GPU (experiments/donation_probe.py). The save must work on
    copies of such arrays and leave device arrays alone (Orbax copies those before returning)."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.io.checkpoint import _detached_from_donation

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = jnp.arange(8.0)
    on_host = jax.device_put(jnp.arange(8.0), device.with_memory_kind("pinned_host"))
    detached = _detached_from_donation({"lora": on_device, "moment": on_host})
    assert detached["lora"] is on_device
    assert detached["moment"].sharding == on_host.sharding
    assert detached["moment"].unsafe_buffer_pointer() != on_host.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(detached["moment"]), np.asarray(on_host))


def test_family_fields_leave_older_fingerprints_unchanged():
    """Checkpoints made before Qwen's fields existed still match their base: a LLaMA architecture
    string names neither field; a Qwen one names its own, so its base differs from LLaMA's."""
    from qlora_jax.io.checkpoint import _architecture
    from tests.models.hf_reference import family_config

    llama_arch = _architecture(family_config("llama"))
    assert "qkv_bias" not in llama_arch and "qk_norm" not in llama_arch
    assert "qkv_bias=True" in _architecture(family_config("qwen2"))
    assert "qk_norm=True" in _architecture(family_config("qwen3"))
    gpt2_fields = ("norm_type", "position_embedding", "hidden_act", "gated_mlp", "fused_qkv")
    assert not any(f"{field}=" in llama_arch for field in gpt2_fields)
    assert all(f"{field}=" in _architecture(family_config("gpt2")) for field in gpt2_fields)


def test_a_checkpoint_of_another_optimizer_state_layout_is_refused_in_one_line():
    """Checkpoints record how the optimizer state is laid out; one from before the per-leaf state
    (no such key) cannot be restored into this version's tree, so resume and export say so."""
    from qlora_jax.io.checkpoint import check_optimizer_state
    from qlora_jax.train.optim import STATE_LAYOUT

    check_optimizer_state({"optimizer_state": STATE_LAYOUT}, STATE_LAYOUT, 8)
    with pytest.raises(ValueError) as err:
        check_optimizer_state({"step": 8}, STATE_LAYOUT, 8)
    message = str(err.value)
    assert (
        "\n" not in message
        and "step 8" in message
        and STATE_LAYOUT in message
        and "whole adapter tree" in message
    )
