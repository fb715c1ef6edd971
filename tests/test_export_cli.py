"""`python -m qlora_jax.export` on a finished run: PEFT, Orbax and merged outputs."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from tests.conftest import run_cli


def test_export_formats_from_a_run(tiny_run, tmp_path):
    run = Path(tiny_run)
    assert {"adapter_model.safetensors", "adapter_config.json", "orbax"} <= set(os.listdir(run / "adapter"))
    for fmt in ("peft", "orbax", "merged"):
        cmd = [
            sys.executable,
            "-m",
            "qlora_jax.export",
            "--run",
            str(run),
            "--format",
            fmt,
            "--out",
            str(tmp_path / fmt),
            "--dtype",
            "float32",
        ] + (["--requantize_error"] if fmt == "merged" else [])
        res = run_cli(cmd)
        assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.numpy import load_file

    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    written = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert sorted(exported) == sorted(written)
    for k in written:
        np.testing.assert_array_equal(exported[k], written[k])
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 16
    assert (tmp_path / "merged" / "config.json").exists() and (
        tmp_path / "merged" / "tokenizer.json"
    ).exists()
    assert "relative RMS error" in res.stdout


def test_export_of_a_missing_run_is_one_line(tmp_path):
    res = run_cli(
        [
            sys.executable,
            "-m",
            "qlora_jax.export",
            "--run",
            str(tmp_path / "none"),
            "--format",
            "peft",
            "--out",
            str(tmp_path / "o"),
        ],
        timeout=300,
    )
    assert res.returncode != 0 and "is not a run directory (no config.json)" in res.stderr
    assert "Traceback" not in res.stderr
