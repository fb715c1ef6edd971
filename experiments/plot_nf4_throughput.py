"""Bar plot of experiments/results/nf4_throughput.json against the device's copy bandwidth.

python experiments/plot_nf4_throughput.py
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    with open(os.path.join(HERE, "results", "nf4_throughput.json")) as f:
        result = json.load(f)
    rows = result["linears"]
    labels = [f"{r['linear']}\n{r['shape'][0]}x{r['shape'][1]}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([x - 0.2 for x in xs], [r["quantize_gbs"] for r in rows], 0.4, label="quantize (bf16 -> NF4+DQ)")
    ax.bar([x + 0.2 for x in xs], [r["dequantize_gbs"] for r in rows], 0.4, label="dequantize (-> bf16)")
    ax.axhline(result["copy_bandwidth_gbs"], color="k", ls="--", label="device copy (read+write)")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("GB/s moved (read + write)")
    ax.set_title(f"NF4 throughput, Llama-2-7B linears, {result['gpu']}, jax {result['jax']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results", "nf4_throughput.png"), dpi=120)


if __name__ == "__main__":
    main()
