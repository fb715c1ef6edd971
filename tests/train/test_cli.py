"""`python -m qlora_jax.train` end to end on a tiny model, and its one-line errors, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli, tiny_run_overrides, train_command


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return run_cli(train_command(*overrides))


def test_cli_trains_and_writes_the_run_directory(tiny_model, tmp_path):
    run = tmp_path / "run"
    out = _train(
        f"--config.model.path={tiny_model}",
        "--config.train.max_steps=4",
        "--config.optim.warmup_steps=1",
        "--config.train.log_every=1",
        "--config.train.eval_every=2",
        "--config.train.eval_batches=1",
        "--config.train.exact_match_examples=4",
        "--config.train.max_new_tokens=3",
        "--config.data.train_path=builtin:addition:64",
        "--config.data.max_seq_len=64",  # the tiny model's max_position_embeddings
        f"--config.output_dir={run}",
        "--config.lora.target_modules=q_proj,v_proj",
        "--config.optim.lr=1e-4",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainable params:" in out.stdout and "exact match after training" in out.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["lr"] == 1e-4 and config["lora"]["target_modules"] == "q_proj,v_proj"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in train_rows)
    assert train_rows[0]["lr"] == 0.0 and train_rows[1]["lr"] == pytest.approx(1e-4)  # warmup, then cosine
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "lr.png"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= summary["exact_match_after"] <= 1.0
    # before step 1: the compiled step's memory need, printed and in the summary
    memory = summary["memory_estimate"]
    assert memory["total_bytes"] >= memory["arguments_bytes"] > 0 and memory["temporaries_bytes"] > 0
    memory_line = next(line for line in out.stdout.splitlines() if line.startswith("memory: "))
    assert memory_line.startswith(f"memory: the compiled step needs {memory['total_bytes'] / 2**30:.2f} GiB")
    assert out.stdout.index("memory: ") < out.stdout.index("exact match after training")
    # measured peaks: the CPU client keeps no memory statistics, so both are recorded as None there
    assert summary["peak_device_bytes"] is None and summary["peak_device_bytes_after_compile"] is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "--config.lora.rank=8",
            "error: unknown config key 'lora.rank': no 'rank' in lora; valid there: ['alpha'",
        ),
        (
            "--config.trian.batch_size=8",
            "error: unknown config key 'trian.batch_size': no 'trian' in the top level",
        ),
        ("--config.lora.r=eight", "error: lora.r='eight': expected int (the recipe has 16)"),
        ("--config.data.train_path=/no/such.jsonl", "error: data file not found: /no/such.jsonl"),
        ("--config.data.format=sharegpt", "error: data.format='sharegpt': valid: 'alpaca', 'chat'"),
    ],
)
def test_bad_configuration_gets_one_line_naming_the_key(tiny_model, tmp_path, override, expected):
    out = _train(
        f"--config.model.path={tiny_model}",
        f"--config.output_dir={tmp_path}",
        "--config.data.max_seq_len=64",
        override,
    )
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_tensorboardx_and_matplotlib_warn_at_start_and_the_run_completes(tiny_model, tmp_path):
    """A GPU image without the optional writers: one warning line each at start, no traceback."""
    driver = tmp_path / "without_writers.py"
    driver.write_text(
        "import runpy, sys\n"
        "sys.modules['tensorboardX'] = None  # import raises ImportError, as when not installed\n"
        "sys.modules['matplotlib'] = None\n"
        "runpy.run_module('qlora_jax.train', run_name='__main__')\n"
    )
    run = tmp_path / "run"
    # 6 steps as tiny_run (the schedule's length is compiled into the step): the session's cached
    # compile of tiny_run's step serves
    command = train_command(*tiny_run_overrides(tiny_model, run, 6))
    out = run_cli([sys.executable, str(driver), *command[3:]])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    warnings = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
    missing = [lines[i].split(":")[1].strip() for i in warnings]
    assert missing == ["tensorboardX is not installed", "matplotlib is not installed"]
    assert warnings[-1] < next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert (run / "metrics.jsonl").exists() and (run / "adapter").is_dir()
    assert not (run / "tensorboard").exists() and not (run / "plots").exists()


def test_the_cli_keeps_compiled_steps_in_a_persistent_cache_unless_told_otherwise(monkeypatch):
    import jax

    from qlora_jax.train import cli

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
        jax.config.update("jax_compilation_cache_dir", None)
        cli.use_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None  # JAX reads the variable itself
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        cli.use_compilation_cache()
        assert jax.config.jax_compilation_cache_dir.endswith("/.cache/qlora_jax/jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_host_pool_is_sized_to_the_machine_unless_set(monkeypatch):
    """The CLI lets XLA keep offloaded activations in 85% of the machine's memory (XLA's own
    default, 64 GB, stops Llama-3-8B's long contexts); a value the user set is kept."""
    from qlora_jax.models.decoder import HOST_POOL_VARIABLE, host_pool_bytes
    from qlora_jax.train import cli

    monkeypatch.setenv(HOST_POOL_VARIABLE, "7")
    cli.size_host_pool()
    assert host_pool_bytes() == 7e9
    monkeypatch.delenv(HOST_POOL_VARIABLE)
    cli.size_host_pool()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0.84 * memory <= host_pool_bytes() + 1e9 and host_pool_bytes() <= 0.85 * memory
