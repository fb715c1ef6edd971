"""NF4 quantize / dequantize throughput on the GPU for Llama-2-7B's linear shapes.

Compared against the device's copy bandwidth (an elementwise bf16 op, bytes read + written).
Throughput counts bytes moved: quantize reads bf16 (2 B/param) and writes codes + scales
(~0.52 B/param); dequantize the reverse. Writes one JSON file.

  python experiments/nf4_throughput.py --out experiments/results/nf4_throughput.json
"""

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp

from qlora_jax.quant import nf4

# (name, (out_features, in_features)) of one Llama-2-7B decoder layer's projections.
LLAMA2_7B_LINEARS = [
    ("q_proj/k_proj/v_proj/o_proj", (4096, 4096)),
    ("gate_proj/up_proj", (11008, 4096)),
    ("down_proj", (4096, 11008)),
]
REPEATS = 30
ROTATE = 3  # distinct inputs per shape so repeated runs do not measure the L2 cache


def _median_seconds(fn, inputs):
    for x in inputs:  # warm-up: compile and first launch
        jax.block_until_ready(fn(x))
    times = []
    for i in range(REPEATS):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth_gbs(n_bytes=2 << 30):
    """bf16 x -> x * 2 over `n_bytes`: the device's practical read+write bandwidth."""
    x = [jnp.ones((n_bytes // 2,), jnp.bfloat16) * (i + 1) for i in range(2)]
    seconds = _median_seconds(jax.jit(lambda a: a * 2), x)
    return 2 * n_bytes / seconds / 1e9


def measure_shape(shape):
    keys = jax.random.split(jax.random.key(0), ROTATE)
    weights = [jax.random.normal(k, shape, jnp.bfloat16) * 0.02 for k in keys]
    quantize = jax.jit(nf4.quantize)
    dequantize = jax.jit(lambda q: nf4.dequantize(q, jnp.bfloat16))
    quantized = [quantize(w) for w in weights]
    dense_bytes = weights[0].size * 2
    q_bytes = quantized[0].nbytes
    t_q = _median_seconds(quantize, weights)
    t_dq = _median_seconds(dequantize, quantized)
    return {
        "shape": list(shape),
        "params": weights[0].size,
        "quantize_ms": t_q * 1e3,
        "dequantize_ms": t_dq * 1e3,
        "quantize_gbs": (dense_bytes + q_bytes) / t_q / 1e9,
        "dequantize_gbs": (dense_bytes + q_bytes) / t_dq / 1e9,
        "bits_per_param": quantized[0].bits_per_param,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = jax.devices()[0]
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for name, shape in LLAMA2_7B_LINEARS:
        row = {"linear": name, **measure_shape(shape)}
        row["quantize_frac_of_copy"] = row["quantize_gbs"] / copy_gbs
        row["dequantize_frac_of_copy"] = row["dequantize_gbs"] / copy_gbs
        rows.append(row)
        print(json.dumps(row))
    per_layer = {"q_proj/k_proj/v_proj/o_proj": 4, "gate_proj/up_proj": 2, "down_proj": 1}
    model_quantize_s = 32 * sum(per_layer[r["linear"]] * r["quantize_ms"] for r in rows) / 1e3
    model_dequantize_s = 32 * sum(per_layer[r["linear"]] * r["dequantize_ms"] for r in rows) / 1e3
    result = {
        "experiment": "nf4_throughput",
        "gpu": device.device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "format": "NF4, block 64, double quantization (block 256), bf16 in/out",
        "copy_bandwidth_gbs": copy_gbs,
        "linears": rows,
        "llama2_7b_all_linears_quantize_s": model_quantize_s,
        "llama2_7b_all_linears_dequantize_s": model_dequantize_s,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "linears"}))


if __name__ == "__main__":
    main()
