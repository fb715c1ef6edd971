"""Bar chart of experiments/results/offload_benchmark.json: device peak memory and step time."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    with open("experiments/results/offload_benchmark.json") as f:
        data = json.load(f)
    comps = data["comparisons"]
    labels = [f"{c['batch']}x{c['seq']}" for c in comps]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(9, 3.5))
    for offset, offload in ((-0.2, False), (0.2, True)):
        runs = [next(r for r in c["runs"] if r["offload_state"] == offload) for c in comps]
        name = "state in pinned host" if offload else "state on device"
        xs = [i + offset for i in range(len(comps))]
        ax_mem.bar(xs, [r["peak_device_bytes"] / 2**30 for r in runs], width=0.4, label=name)
        ax_time.bar(xs, [r["step_seconds_median"] * 1e3 for r in runs], width=0.4, label=name)
    device = comps[0]["runs"][0]["device"]
    setup = data["setup"]
    for ax, title in ((ax_mem, "device peak memory (GiB)"), (ax_time, "step time (ms)")):
        ax.set_xticks(range(len(comps)), labels)
        ax.set_xlabel("batch x sequence")
        ax.set_title(title)
    ax_mem.legend(fontsize=8)
    title = f"QLoRA {setup['preset']} NF4, LoRA r={setup['r']} all-linear, remat={setup['remat']}, {device}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig("experiments/results/offload_benchmark.png", dpi=120)


if __name__ == "__main__":
    main()
