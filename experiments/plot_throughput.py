"""Table and bar plot of the latest complete call in experiments/results/throughput.jsonl."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FRAMEWORKS = ("qlora_jax", "torch+peft+bnb")


def latest_call(rows: list[dict]) -> list[dict]:
    calls = [r["call"] for r in rows if "call" in r and "tokens_per_s" in r]
    return [r for r in rows if r.get("call") == calls[-1] and "tokens_per_s" in r]


def main() -> None:
    with open("experiments/results/throughput.jsonl") as f:
        rows = latest_call([json.loads(line) for line in f if line.strip()])
    shapes = list(dict.fromkeys(f"{r['shape']} {r['batch']}x{r['seq']}" for r in rows))
    by = {(f"{r['shape']} {r['batch']}x{r['seq']}", r["framework"]): r for r in rows}
    print(
        "| shape | batch x seq | qlora_jax tok/s | PyTorch tok/s | speedup | qlora_jax peak | PyTorch peak "
        "| qlora_jax TFLOP/s (6N) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in shapes:
        j, t = by[(s, "qlora_jax")], by[(s, "torch+peft+bnb")]
        name, bxs = s.split()
        print(
            f"| {name} | {bxs} | {j['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
            f"{j['tokens_per_s'] / t['tokens_per_s']:.2f}x | {j['peak_mem_gib']:.2f} GiB | "
            f"{t['peak_mem_gib']:.2f} GiB | {j['tflops_6N']:.0f} ({j['pct_bf16_peak']:.0f}%) |"
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
        f"QLoRA r=16 all-linear, NF4+DQ, bf16, grad checkpointing; {rows[0]['gpu']}, one call", fontsize=9
    )
    fig.tight_layout()
    fig.savefig("experiments/results/throughput.png", dpi=120)


if __name__ == "__main__":
    main()
