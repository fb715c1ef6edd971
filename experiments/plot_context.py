"""Peak GPU memory against context length, per framework and setting, from
experiments/results/context.jsonl (rows that fit; one line per framework + remat + seq_tile)."""

import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(row: dict) -> str:
    if row["framework"] != "qlora_jax":
        return row["framework"]
    if "remat" not in row:  # a failed run before its settings were recorded
        return "qlora_jax (settings not recorded)"
    return f"qlora_jax remat={row['remat']} seq_tile={row['seq_tile']}"


def main() -> None:
    with open("experiments/results/context.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r.get("fits"):
            lines[label(r)][r["seq"]] = r["peak_mem_gib"]  # later calls replace earlier ones
    gpus = sorted({r["gpu"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(lines.items()):
        seqs = sorted(points)
        ax.plot(seqs, [points[s] for s in seqs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens), batch 1")
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.set_title(f"Llama-3-8B shape, LoRA r=32, NF4; {', '.join(gpus)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("experiments/results/context.png", dpi=120)
    print("| framework / setting | seq | peak GiB | tok/s | call |")
    print("|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_mem_gib']:.2f}" if r.get("fits") else "does not fit"
        speed = f"{r['tokens_per_s']:,.0f}" if r.get("fits") else "-"
        print(f"| {label(r)} | {r['seq']:,} | {peak} | {speed} | {r['call']} |")


if __name__ == "__main__":
    main()
