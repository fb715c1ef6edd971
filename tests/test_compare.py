"""`python -m qlora_jax.compare` end to end on a tiny model: both frameworks stay within the study's
fp32 tolerance step by step, and the run directory holds every promised output.

Tolerance: per-step |delta loss| <= 1e-3, the fp32 dropout-0 target of the study
(experiments/compare_pytorch). Both sides compute in float32 from identical weights, adapters and
batches and differ only in summation order; on SmolLM2 the observed gap is ~1e-5 per step, so
1e-3 leaves room for float32 noise that AdamW amplifies over steps, yet catches any real
divergence (a wrong schedule, clip, decay, mask or loss normalization moves the loss by >1e-2).
The NF4 base (with 2 accumulated micro-batches) runs the same check: both sides use bitsandbytes'
own 4-bit codes.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.conftest import REPO, run_cli

TOLERANCE = 1e-3


# the NF4 base with accumulation: the CLI's own path end to end (the unquantized step is held to
# peft in-process by tests/train/test_peft_parity.py; a second CLI case cost ~22 s of CPU)
@pytest.mark.parametrize(("quantization", "accumulation"), [("nf4", 2)])
def test_compare_cli_matches_pytorch_step_by_step(tiny_model, tmp_path, quantization, accumulation):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "qlora_jax.compare",
        "--config",
        os.path.join(REPO, "configs/compare_smollm2_gsm8k.py"),
        f"--config.model.path={tiny_model}",
        f"--config.model.quantization={quantization}",
        f"--config.optim.accumulation_steps={accumulation}",
        "--config.data.train_path=builtin:addition:200",
        "--config.data.eval_path=builtin:addition",
        "--config.data.format=prompt_completion",
        "--config.data.prompt_key=prompt",
        "--config.data.completion_key=completion",
        "--config.data.max_seq_len=64",
        "--config.train.batch_size=2",
        "--config.train.max_steps=8",
        "--config.optim.warmup_steps=2",
        "--config.optim.lr=1e-3",
        "--config.optim.weight_decay=0.01",
        "--config.train.eval_batches=1",
        "--config.train.max_new_tokens=4",
        "--config.train.exact_match=exact",
        "--config.compare.prompts=2",
        f"--config.output_dir={run}",
    ]
    out = run_cli(command)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert abs(r["loss_jax"] - r["loss_torch"]) <= TOLERANCE, r
        assert r["lr_jax"] == pytest.approx(r["lr_torch"], rel=1e-6, abs=1e-12)
    assert rows[-1]["loss_jax"] < rows[0]["loss_jax"]  # it trained (lr 1e-3 on a random model)
    summary = json.loads((run / "summary.json").read_text())
    after = summary["eval_loss_after"]
    assert abs(after["jax"] - after["torch"]) <= TOLERANCE
    assert summary["loss_delta"]["max_abs_delta"] <= TOLERANCE
    for name in ("loss_curves.png", "summary.md", "generations.md", "generations.jsonl", "config.json"):
        assert (run / name).stat().st_size > 0, name
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all(
        {"prompt", "jax", "torch", "reference"} <= g.keys() for g in generations
    )
