"""Table and bar plot from experiments/results/throughput.jsonl: per shape, the latest call that
measured every named framework (their rows side by side; the last row of a framework in that call
when a call measured several settings).
  python experiments/plot_throughput.py [--frameworks qlora_jax,torch+peft+bnb,unsloth]
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHORT = {"qlora_jax": "qlora_jax", "torch+peft+bnb": "PyTorch", "unsloth": "Unsloth"}


def latest_rows(rows: list[dict], frameworks: list[str]) -> dict[tuple, dict[str, dict]]:
    """{(shape, batch, seq): {framework: row}} from the latest call that measured them all."""
    done = [r for r in rows if "tokens_per_s" in r and r.get("call")]
    calls = list(dict.fromkeys(r["call"] for r in done))
    chosen: dict[tuple, dict[str, dict]] = {}
    for key in dict.fromkeys((r["shape"], r["batch"], r["seq"]) for r in done):
        for call in reversed(calls):
            same = {
                r["framework"]: r
                for r in done
                if (r["shape"], r["batch"], r["seq"]) == key and r["call"] == call
            }
            if set(frameworks) <= set(same):
                chosen[key] = {f: same[f] for f in frameworks}
                break
    return chosen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frameworks", default="qlora_jax,torch+peft+bnb,unsloth")
    p.add_argument("--rows", default="experiments/results/throughput.jsonl")
    p.add_argument("--out", default="experiments/results/throughput.png")
    a = p.parse_args()
    frameworks = a.frameworks.split(",")
    with open(a.rows) as f:
        chosen = latest_rows([json.loads(line) for line in f if line.strip()], frameworks)
    if not chosen:
        raise SystemExit(f"no call in {a.rows} measured all of {frameworks}")
    names = [SHORT.get(f, f) for f in frameworks]
    print(
        "| shape | batch x seq | "
        + " | ".join(f"{n} tok/s" for n in names)
        + " | "
        + " | ".join(f"{n} peak" for n in names)
        + " | call |"
    )
    print("|---|---|" + "---|" * (2 * len(frameworks) + 1))
    for (shape, batch, seq), by in chosen.items():
        ours = by[frameworks[0]]["tokens_per_s"]
        speeds = [
            f"{by[f]['tokens_per_s']:,.0f}" + ("" if i == 0 else f" ({ours / by[f]['tokens_per_s']:.2f}x)")
            for i, f in enumerate(frameworks)
        ]
        peaks = [f"{by[f]['peak_mem_gib']:.2f} GiB" for f in frameworks]
        print(
            f"| {shape} | {batch} x {seq} | "
            + " | ".join(speeds + peaks)
            + f" | {by[frameworks[0]]['call']} |"
        )
    labels = [f"{shape} {batch}x{seq}" for shape, batch, seq in chosen]
    width = 0.8 / len(frameworks)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (fw, name) in enumerate(zip(frameworks, names, strict=True)):
        xs = [i + (k - (len(frameworks) - 1) / 2) * width for i in range(len(labels))]
        ax_t.bar(xs, [by[fw]["tokens_per_s"] for by in chosen.values()], width=width, label=name)
        ax_m.bar(xs, [by[fw]["peak_mem_gib"] for by in chosen.values()], width=width, label=name)
    for ax, title in ((ax_t, "training tokens/s"), (ax_m, "peak device memory (GiB)")):
        ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax.set_title(title)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    gpu = next(iter(chosen.values()))[frameworks[0]]["gpu"]
    fig.suptitle(
        f"QLoRA NF4+DQ, LoRA on all 7 projections, bf16; {gpu}; the bars of a shape come from one call",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)


if __name__ == "__main__":
    main()
