"""What a comparison run leaves behind: summary numbers and table, the loss-curve plot, generations."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def delta_stats(rows: Sequence[dict[str, float]], first_steps: int) -> dict[str, float]:
    """max and mean |loss_jax - loss_torch| over all steps and over the first `first_steps`."""
    deltas = np.array([abs(r["loss_jax"] - r["loss_torch"]) for r in rows])
    head = deltas[:first_steps]
    return {
        "max_abs_delta": float(deltas.max()),
        "mean_abs_delta": float(deltas.mean()),
        f"max_abs_delta_first_{first_steps}": float(head.max()),
        f"mean_abs_delta_first_{first_steps}": float(head.mean()),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """One table: per-step |delta loss|, eval losses of both sides and their relative difference."""
    lines = ["| quantity | qlora_jax | PyTorch | difference |", "|---|---|---|---|"]
    for key, value in summary["loss_delta"].items():
        lines.append(f"| train loss, {key.replace('_', ' ')} | | | {value:.2e} |")
    for tag in ("before", "after"):
        jax_loss, torch_loss = summary[f"eval_loss_{tag}"]["jax"], summary[f"eval_loss_{tag}"]["torch"]
        rel = abs(jax_loss - torch_loss) / abs(torch_loss)
        lines.append(f"| eval loss {tag} training | {jax_loss:.5f} | {torch_loss:.5f} | {rel:.3%} relative |")
    match = summary["exact_match"]
    lines.append(
        f"| exact match, {match['prompts']} held-out prompts | {match['jax']:.0%} | {match['torch']:.0%} | |"
    )
    seconds = summary["seconds_per_step"]
    lines.append(f"| seconds per step (this machine) | {seconds['jax']:.2f} | {seconds['torch']:.2f} | |")
    return "\n".join(lines) + "\n"


def plot_losses(path: str, rows: Sequence[dict[str, float]], title: str) -> None:
    """Both loss curves overlaid, and |delta loss| per step on a log scale below them."""
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    top.plot(steps, [r["loss_torch"] for r in rows], label="transformers + peft", lw=2.5, alpha=0.6)
    top.plot(steps, [r["loss_jax"] for r in rows], label="qlora_jax", lw=1)
    top.set_ylabel("train loss (nats/token)")
    top.set_title(title)
    top.legend()
    bottom.semilogy(steps, [max(abs(r["loss_jax"] - r["loss_torch"]), 1e-9) for r in rows], lw=1)
    bottom.set_ylabel("|delta loss|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_generations(run_dir: str, records: Sequence[dict[str, Any]]) -> None:
    """generations.jsonl, and generations.md with both frameworks' answers side by side."""
    with open(os.path.join(run_dir, "generations.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    parts = []
    for i, r in enumerate(records):
        same = "identical" if r["jax"] == r["torch"] else "differ"
        parts.append(
            f"## Prompt {i} ({same})\n\n```\n{r['prompt']}\n```\n\n"
            f"| qlora_jax | transformers + peft |\n|---|---|\n"
            f"| {_cell(r['jax'])} | {_cell(r['torch'])} |\n\nreference: {_cell(r['reference'])}\n"
        )
    with open(os.path.join(run_dir, "generations.md"), "w") as f:
        f.write("# Greedy generations after training\n\n" + "\n".join(parts))


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>")
