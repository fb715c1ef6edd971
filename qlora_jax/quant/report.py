"""Quantize every linear weight of a GGUF model to NF4 (and FP4) and report size and error.

`python -m qlora_jax.quant.report [--gguf PATH]` (default: the embedded SmolLM2-135M). This is
the demo until the training loop lands: it shows what the frozen base costs in 4 bits.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.io import gguf as gguf_io
from qlora_jax.quant import nf4

# GGUF names of the seven LLaMA projections QLoRA quantizes.
LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _relative_rms(approx: jax.Array, exact: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean((approx - exact) ** 2) / jnp.mean(exact**2))


@jax.jit
def _quantize_both(w: jax.Array) -> tuple[nf4.NF4Tensor, jax.Array, jax.Array]:
    """(NF4+DQ tensor, its relative RMS error, FP4's): one compiled program per weight shape."""
    exact = w.astype(jnp.float32)
    q = nf4.quantize(w)
    fp4 = nf4.quantize(w, quant_type="fp4")
    return (
        q,
        _relative_rms(q.dequantize(jnp.float32), exact),
        _relative_rms(fp4.dequantize(jnp.float32), exact),
    )


def quantize_report(path: str) -> dict[str, dict[str, float]]:
    """Per projection kind: tensors, params, NF4+DQ bytes, and relative RMS error of NF4/FP4."""
    rows: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for name, weight in gguf_io.iter_tensors(path):
        kind = name.split(".")[-2]
        if kind not in LINEAR_KINDS:
            continue
        w = jnp.asarray(weight, jnp.bfloat16)
        q, nf4_err, fp4_err = _quantize_both(w)
        row = rows[kind]
        row["tensors"] += 1
        row["params"] += w.size
        row["bf16_bytes"] += w.size * 2
        row["nf4_bytes"] += q.nbytes
        row["nf4_err_sq"] += float(nf4_err) ** 2
        row["fp4_err_sq"] += float(fp4_err) ** 2
    return rows


def _format_row(label: str, r: Mapping[str, float]) -> str:
    """One table line: sizes, bits/param and the RMS over tensors of each relative error."""
    n = r["tensors"]
    return (
        f"{label:<12}{n:>8.0f}{r['params']:>12,.0f}{r['bf16_bytes'] / 2**20:>10.2f}"
        f"{r['nf4_bytes'] / 2**20:>9.2f}{8 * r['nf4_bytes'] / r['params']:>11.3f}"
        f"{np.sqrt(r['nf4_err_sq'] / n):>13.4f}{np.sqrt(r['fp4_err_sq'] / n):>13.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="GGUF file (default: embedded SmolLM2-135M)")
    args = parser.parse_args()
    path = args.gguf or gguf_io.embedded_model_path()
    start = time.perf_counter()
    rows = quantize_report(path)
    seconds = time.perf_counter() - start
    print(f"model: {path}\nNF4 with double quantization (block 64, scales in blocks of 256)\n")
    header = f"{'projection':<12}{'tensors':>8}{'params':>12}{'bf16 MiB':>10}{'NF4 MiB':>9}"
    print(header + f"{'bits/param':>11}{'NF4 rel-RMS':>13}{'FP4 rel-RMS':>13}")
    total = collections.Counter()
    for kind in LINEAR_KINDS:
        total.update(rows[kind])
        print(_format_row(kind, rows[kind]))
    print(_format_row("all", total))
    print(f"\nread, quantized and checked in {seconds:.1f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
