"""Peak host memory while loading a synthetic 7B-shape HF checkpoint into the NF4 frozen tree.

Writes a random checkpoint of a preset's shape (one safetensors shard per layer, sharded index, as
HF does): bf16 (quantized to NF4 on load), or with --format bnb4bit in the bitsandbytes 4-bit
format (random codes and scales, taken as stored), then loads it in a fresh process with
`llama.from_pretrained(..., quantization="nf4")` and records that process' peak resident memory
(VmHWM) against the checkpoint's size on disk.
Usage: python experiments/load_peak_rss.py [--preset llama2-7b] [--format bf16|bnb4bit]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from qlora_jax.io import bnb4bit
from qlora_jax.io.safetensors_stream import SafetensorsFile, write
from qlora_jax.models.config import to_hf_config
from qlora_jax.models.frozen import LAYER_NORMS, Quantization, linear_shapes
from qlora_jax.models.presets import preset
from qlora_jax.quant import nf4


def random_nf4(rng: np.random.Generator, shape: tuple[int, int]) -> nf4.NF4Tensor:
    """Random codes and double-quantized scales of a 4-bit weight (a valid file, random values)."""
    size, blocks = shape[0] * shape[1], shape[0] * shape[1] // 64
    return nf4.NF4Tensor(
        packed=rng.integers(0, 256, size // 2, dtype=np.uint8),
        absmax=rng.integers(0, 256, blocks, dtype=np.uint8),
        nested_absmax=rng.uniform(0.01, 0.1, -(-blocks // 256)).astype(np.float32),
        offset=np.float32(0.05),
        shape=shape,
        dtype="bfloat16",
        block_size=64,
        nested_block_size=256,
        quant_type="nf4",
    )


def write_checkpoint(name: str, directory: str, fmt: str = "bf16") -> int:
    """A random checkpoint of the named shape in `fmt`; returns its bytes. Skips work already done."""
    cfg = preset(name)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}

    def shard(file: str, tensors: dict[str, tuple[int, ...]]) -> None:
        path = os.path.join(directory, file)
        if not os.path.exists(path):
            arrays = {}
            for k, s in tensors.items():
                if fmt == "bnb4bit" and len(s) == 2 and k.startswith("model.layers."):
                    arrays |= bnb4bit.linear_tensors(k, random_nf4(rng, s))
                else:
                    arrays[k] = (0.02 * rng.standard_normal(s, np.float32)).astype(ml_dtypes.bfloat16)
            write(path, arrays, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(SafetensorsFile(path).names(), file))

    d, v = cfg.hidden_size, cfg.vocab_size
    shard(
        "embed.safetensors",
        {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "model.norm.weight": (d,)},
    )
    for i in range(cfg.num_layers):
        tensors = {f"model.layers.{i}.{n}.weight": (d,) for n in LAYER_NORMS}
        tensors |= {f"model.layers.{i}.{g}.{n}.weight": s for (g, n), s in linear_shapes(cfg).items()}
        shard(f"layer{i:03d}.safetensors", tensors)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    hf_config = to_hf_config(cfg) | {"torch_dtype": "bfloat16"}
    if fmt == "bnb4bit":
        hf_config["quantization_config"] = bnb4bit.config_entry(Quantization(), "bfloat16", None)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return sum(os.path.getsize(os.path.join(directory, f)) for f in set(weight_map.values()))


LOAD = """
import json, sys, time, jax
from qlora_jax.models import llama
t = time.time()
model, frozen = llama.from_pretrained(sys.argv[1], quantization="nf4", dtype="bfloat16")
jax.block_until_ready(frozen)
seconds = time.time() - t
nbytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"load_seconds": seconds, "frozen_bytes": nbytes,
                  "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--format", default="bf16", choices=["bf16", "bnb4bit"])
    parser.add_argument("--dir", default="/tmp/qlora_jax_synthetic")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    suffix = "" if args.format == "bf16" else f"_{args.format}"
    out_path = args.out or f"experiments/results/load_peak_rss{suffix}.json"
    directory = os.path.join(args.dir, args.preset + suffix)
    t = time.time()
    checkpoint_bytes = write_checkpoint(args.preset, directory, args.format)
    print(f"checkpoint {checkpoint_bytes / 2**30:.2f} GiB written in {time.time() - t:.0f} s", flush=True)
    env = os.environ | {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run(
        [sys.executable, "-c", LOAD, directory], env=env, check=True, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result |= {
        "preset": args.preset,
        "params": preset(args.preset).num_params,
        "format": args.format,
        "checkpoint_bytes": checkpoint_bytes,
        "peak_rss_over_checkpoint": result["peak_rss_bytes"] / checkpoint_bytes,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, JAX_PLATFORMS={env['JAX_PLATFORMS']}",
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    gib = 2**30
    print(
        f"{args.preset}: checkpoint {checkpoint_bytes / gib:.2f} GiB {args.format} -> frozen NF4 "
        f"{result['frozen_bytes'] / gib:.2f} GiB; peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB "
        f"({result['peak_rss_over_checkpoint']:.2f}x the checkpoint); "
        f"load {result['load_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
