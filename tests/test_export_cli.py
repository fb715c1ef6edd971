"""`python -m qlora_jax.export` on a finished run: PEFT, Orbax, merged and bnb-4bit outputs."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from tests.conftest import run_cli


def test_export_formats_from_a_run(tiny_run, tmp_path):
    run = Path(tiny_run)
    assert {"adapter_model.safetensors", "adapter_config.json", "orbax"} <= set(os.listdir(run / "adapter"))
    for fmt in ("peft", "orbax", "merged", "bnb4bit"):
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
        ] + {"merged": ["--requantize_error"], "bnb4bit": ["--merge"]}.get(fmt, [])
        res = run_cli(cmd)
        assert res.returncode == 0, res.stderr[-2000:]
        assert fmt not in ("merged", "bnb4bit") or "relative RMS error" in res.stdout
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
    _merged_4bit_loads_in_transformers_near_the_merged_model(tmp_path / "bnb4bit", tmp_path / "merged")


def _merged_4bit_loads_in_transformers_near_the_merged_model(bnb_dir: Path, merged_dir: Path) -> None:
    """The adapters folded in and requantized to NF4 (bnb4bit --merge) load in transformers with
    bitsandbytes; their logits stay within NF4's requantization error of the 16-bit merged
    model's (NF4 adds ~10% relative RMS to each weight: rel 0.3 on the logits)."""
    import torch
    import transformers

    config = json.loads((bnb_dir / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 49152, (1, 8)))
    logits = {}
    for name, path in (("4bit", bnb_dir), ("merged", merged_dir)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits.float().numpy()
    assert np.abs(logits["4bit"] - logits["merged"]).max() < 0.3 * np.abs(logits["merged"]).max()


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
