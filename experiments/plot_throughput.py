"""Table and bar plot from experiments/results/throughput.jsonl: per shape, the latest call that
measured both frameworks."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FRAMEWORKS = ("qlora_jax", "torch+peft+bnb")


def is_default_setting(row: dict) -> bool:
    """The compared configuration: NF4 base, full remat (lever runs vary these)."""
    return row.get("quantization", "nf4") == "nf4" and row.get("remat", "full") == "full"


def latest_pairs(rows: list[dict]) -> list[dict]:
    """For each shape, both frameworks' rows from the latest call that measured both."""
    done = [r for r in rows if "tokens_per_s" in r and "call" in r and is_default_setting(r)]
    pairs: dict[tuple, list[dict]] = {}
    for key in dict.fromkeys((r["shape"], r["batch"], r["seq"]) for r in done):
        for call in reversed(list(dict.fromkeys(r["call"] for r in done))):
            same = {
                r["framework"]: r
                for r in done
                if (r["shape"], r["batch"], r["seq"]) == key and r["call"] == call
            }
            if set(FRAMEWORKS) <= set(same):
                pairs[key] = [same[f] for f in FRAMEWORKS]
                break
    return [r for pair in pairs.values() for r in pair]


def main() -> None:
    with open("experiments/results/throughput.jsonl") as f:
        rows = latest_pairs([json.loads(line) for line in f if line.strip()])
    shapes = list(dict.fromkeys(f"{r['shape']} {r['batch']}x{r['seq']}" for r in rows))
    by = {(f"{r['shape']} {r['batch']}x{r['seq']}", r["framework"]): r for r in rows}
    print(
        "| shape | batch x seq | qlora_jax tok/s | PyTorch tok/s | speedup | qlora_jax peak | PyTorch peak "
        "| qlora_jax TFLOP/s (6N) | call |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in shapes:
        j, t = by[(s, "qlora_jax")], by[(s, "torch+peft+bnb")]
        name, bxs = s.split()
        print(
            f"| {name} | {bxs} | {j['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
            f"{j['tokens_per_s'] / t['tokens_per_s']:.2f}x | {j['peak_mem_gib']:.2f} GiB | "
            f"{t['peak_mem_gib']:.2f} GiB | {j['tflops_6N']:.0f} ({j['pct_bf16_peak']:.0f}%) | {j['call']} |"
        )
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for offset, fw in ((-0.2, FRAMEWORKS[0]), (0.2, FRAMEWORKS[1])):
        xs = [i + offset for i in range(len(shapes))]
        ax_t.bar(xs, [by[(s, fw)]["tokens_per_s"] for s in shapes], width=0.4, label=fw)
        ax_m.bar(xs, [by[(s, fw)]["peak_mem_gib"] for s in shapes], width=0.4, label=fw)
    for ax, title in ((ax_t, "training tokens/s"), (ax_m, "peak device memory (GiB)")):
        ax.set_xticks(range(len(shapes)), shapes, rotation=15, fontsize=8)
        ax.set_title(title)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.suptitle(
        f"QLoRA r=16 all-linear, NF4+DQ, bf16, grad checkpointing; {rows[0]['gpu']}; "
        "both bars of a shape from one call",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig("experiments/results/throughput.png", dpi=120)


if __name__ == "__main__":
    main()
