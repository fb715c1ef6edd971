"""Tokens/s against GPU count per layout kind (data, fsdp, data x fsdp, PyTorch DDP) from one call
of experiments/bench_scaling.py in experiments/results/scaling.jsonl, with the ideal line (the
one-GPU rate times the GPU count), and the markdown table of that call. Usage:
  python experiments/plot_scaling.py [--call CALL]   (default: the latest call)
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def kind(layout: str) -> str:
    """The line a layout belongs to: 'torch DDP', or its mesh axes larger than 1 ('data', 'fsdp')."""
    if layout.startswith("torch"):
        return "torch+peft+bnb DDP"
    axes = [kv.split("=") for kv in layout.split(":")[1].split(";")]
    return " x ".join(name for name, size in axes if int(size) > 1) or "1 GPU"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--call", default="")
    a = p.parse_args()
    with open("experiments/results/scaling.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    call = a.call or rows[-1]["call"]
    rows = [r for r in rows if r["call"] == call and "tokens_per_s" in r]
    base = next(r for r in rows if r["devices"] == 1 and not r["layout"].startswith("torch"))
    others = [r for r in rows if r["preset"] != base["preset"]]  # e.g. a 70B row with no 1-GPU run
    rows = [r for r in rows if r["preset"] == base["preset"]]
    lines: dict[str, dict[int, float]] = defaultdict(dict)
    # the A/B probe's rows (GSPMD's own placement; older rows name it grad_sum) are in the table only
    for r in [r for r in rows if "gspmd" not in (r.get("placement"), r.get("grad_sum"))]:
        lines[kind(r["layout"])][r["devices"]] = r["tokens_per_s"]
    for name in [n for n in lines if n not in ("1 GPU", "torch+peft+bnb DDP")]:
        lines[name][1] = base["tokens_per_s"]
    most = max(r["devices"] for r in rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([1, most], [base["tokens_per_s"], most * base["tokens_per_s"]], "k--", label="ideal (1 GPU x N)")
    for name, points in sorted(lines.items()):
        if name != "1 GPU":
            gpus = sorted(points)
            ax.plot(gpus, [points[g] for g in gpus], marker="o", label=name)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(range(1, most + 1))
    ax.set_title(
        f"{base['preset']} NF4 LoRA r={base['rank']}, "
        f"{base['per_device_batch']} x {base['seq']} per data rank; {base['gpu']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("experiments/results/scaling.png", dpi=120)
    print(f"call {call}, {base['gpu']}")
    print("| layout | tokens/s | vs 1 GPU | efficiency | peak per device | start to first step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        data_ranks = r["global_batch"] // r["per_device_batch"] if "global_batch" in r else r["devices"]
        peak = r.get("peak_mem_gib_per_device") or [r.get("peak_mem_gib", float("nan"))]
        first = f"{r['start_to_first_step_s']:.0f} s" if "start_to_first_step_s" in r else "-"
        print(
            f"| {r['layout']}{f' ({label})' if (label := r.get('label')) else ''} | "
            f"{r['tokens_per_s']:,.0f} | {speedup:.2f}x | "
            f"{speedup / data_ranks:.0%} | {max(peak):.2f} GiB | {first} |"
        )
    for r in others:
        print(
            f"| {r['preset']} r={r['rank']} {r['per_device_batch']} x {r['seq']}, {r['layout']} | "
            f"{r['tokens_per_s']:,.0f} | - | - | {max(r['peak_mem_gib_per_device']):.2f} GiB "
            f"(load {max(r['load_peak_gib_per_device']):.2f}, share {r['frozen_gib_per_device']:.2f}) | "
            f"{r['start_to_first_step_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
