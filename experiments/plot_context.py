"""Peak GPU memory and tokens/s against context length, one line per framework (qlora_jax with its
remat setting), for one call of experiments/bench_context.py in experiments/results/context.jsonl;
prints that call's table with qlora_jax and Unsloth side by side. Usage:
  python experiments/plot_context.py [--call CALL]   (default: the latest call)
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(row: dict) -> str:
    if row["framework"] != "qlora_jax":
        return row["framework"]
    return f"qlora_jax remat={row.get('remat', '?')}"


def cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "not run"
    if not row.get("fits"):
        return "out of memory" if row.get("oom") else "failed"
    return format(row[key], fmt)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--call", default="")
    a = p.parse_args()
    with open("experiments/results/context.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    call = a.call or rows[-1]["call"]
    rows = [r for r in rows if r["call"] == call]
    memory: dict[str, dict[int, float]] = defaultdict(dict)
    speed: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r.get("fits"):
            memory[label(r)][r["seq"]] = r["peak_mem_gib"]
            speed[label(r)][r["seq"]] = r["tokens_per_s"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, lines, ylabel in ((axes[0], memory, "peak GPU memory (GiB)"), (axes[1], speed, "tokens/s")):
        for name, points in sorted(lines.items()):
            seqs = sorted(points)
            ax.plot(seqs, [points[s] for s in seqs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens), batch 1")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    gpus = ", ".join(sorted({r["gpu"] for r in rows}))
    fig.suptitle(f"Llama-3-8B shape, LoRA r=32, NF4, batch 1; {gpus}; call {call}", fontsize=10)
    fig.tight_layout()
    fig.savefig("experiments/results/context.png", dpi=120)

    by_seq: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_seq[r["seq"]][r["framework"]] = r
    print(f"call {call}, {gpus}")
    print("| seq | qlora_jax tok/s | Unsloth tok/s | ratio | qlora_jax peak GiB | Unsloth peak GiB | remat |")
    print("|---|---|---|---|---|---|---|")
    for seq in sorted(by_seq):
        ours, theirs = by_seq[seq].get("qlora_jax"), by_seq[seq].get("unsloth")
        both = ours and theirs and ours.get("fits") and theirs.get("fits")
        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if both else "-"
        speeds = f"{cell(ours, 'tokens_per_s', ',.0f')} | {cell(theirs, 'tokens_per_s', ',.0f')}"
        peaks = f"{cell(ours, 'peak_mem_gib', '.2f')} | {cell(theirs, 'peak_mem_gib', '.2f')}"
        print(f"| {seq:,} | {speeds} | {ratio} | {peaks} | {ours.get('remat', '-') if ours else '-'} |")


if __name__ == "__main__":
    main()
