"""Context capacity: how long a sequence each framework trains on one GPU, and at what memory.

Llama-3-8B shape, LoRA r=32 on all 7 projections, batch 1, NF4 + double quant, random tokens.
Each (framework, length) runs in its own process (bench_throughput.py's children): --warmup
untimed steps (default 1; 0 where a step takes minutes: qlora_jax compiles ahead of time, outside
the timing) and --steps timed ones. One row per run is appended to
<out>/context.jsonl with framework, seq, rank, fits, tokens_per_s, peak_mem_gib, gpu and call
(the rows of one invocation share it; pass --call to continue one over several device commands).
Lengths go up in order; a framework that runs out of memory at one length is not tried longer.
  python experiments/bench_context.py --seqs 16384,32768,65536 --frameworks qlora_jax,unsloth --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

from bench_throughput import add_run_args, run_framework

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError", "ran out of memory")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--seqs", default="16384,32768,65536,131072,262144,342733")
    p.add_argument("--frameworks", default="qlora_jax,unsloth")
    add_run_args(p)
    p.set_defaults(r=32, steps=1, warmup=1, remat="auto", offload=1, loss_chunk=256, seq_tile=8192)
    a = p.parse_args()
    import jax

    gpu = jax.devices()[0].device_kind
    call_id = a.call or datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(a.out, exist_ok=True)
    for framework in a.frameworks.split(","):
        for seq in (int(s) for s in a.seqs.split(",")):
            result = run_framework(framework, a.shape, 1, seq, a)
            error = result.pop("error", None)
            row = {
                "framework": framework,
                "shape": a.shape,
                "batch": 1,
                "seq": seq,
                "rank": a.r,
                "fits": error is None,
                "tokens_per_s": result.get("tokens_per_s"),
                "peak_mem_gib": result.get("peak_mem_gib"),
                "gpu": gpu,
                "call": call_id,
                "date": datetime.date.today().isoformat(),
            }
            if framework == "qlora_jax":  # its settings, also on rows whose run failed
                row |= {"remat": a.remat, "seq_tile": a.seq_tile, "offload_state": bool(a.offload)}
                row |= {"dequant_slices": a.dequant_slices, "offload_embeddings": bool(a.offload_embeddings)}
                row |= {"offload_head": bool(a.offload_head)}
            row |= {k: v for k, v in result.items() if k not in row}
            if error is not None:
                row["oom"] = any(m in error for m in OOM_MARKERS)
                row["error"] = error[-600:]
            with open(os.path.join(a.out, "context.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = ("framework", "seq", "fits", "tokens_per_s", "peak_mem_gib")
            print(json.dumps({k: row[k] for k in shown}), flush=True)
            if error is not None:
                break


if __name__ == "__main__":
    main()
