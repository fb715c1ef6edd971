"""Loss and learning-rate curves from metrics.jsonl, drawn into <run>/plots/ at the end of a run."""

from __future__ import annotations

import os

from qlora_jax.train.metrics import optional_package, read_metrics


def available() -> bool:
    return optional_package("matplotlib", "plots/ is skipped")


def draw(run_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    written = []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(run_dir, "plots", "loss.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    fig.tight_layout()
    written.append(os.path.join(run_dir, "plots", "lr.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
