"""GPU probe: cuDNN flash attention on packed rows (segment offsets) against XLA attention with the
explicit segment mask (the model's path for packed rows before d483ebe, and still on meshes of
several devices; issue 18: the training CLI packs GSM8K, so its attention ran on XLA at ~5,500
tok/s where the bench's unpacked rows ran cuDNN at ~8,100). Checks the output and the q/k/v
gradients on real tokens against a float32 reference, and times forward + backward of each path
with the device memory its compiled program plans for temporaries (the packed kernel's backward
workspace grows with rows x slots: the model's path, `attention.packed_flash_attention`, calls it
row by row, a group of slots at a time). Writes $OUT/packed_attention_probe.json.

cuDNN's packed layout takes, per row, each segment's start (`q_offsets`, [B, M + 1]) and length
(`q_seqlen`, [B, M]), -1 past the row's last segment, M a static bound on segments per row; the
probe derives them as the model does (packing.segment_starts, then attention.packed_layout).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from qlora_jax.data import packing
from qlora_jax.models import attention

SHAPES = {  # name: (batch, length, query heads, kv heads, head dim)
    "llama3-8b 1x2048": (1, 2048, 32, 8, 128),
    "llama2-7b 4x2048": (4, 2048, 32, 32, 128),
}


def segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Segment ids like the packer's: GSM8K-sized examples (100-400 tokens) from 1, 0 for the
    padding left at the end of a row."""
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        start, segment = 0, 1
        while True:
            n = int(rng.integers(100, 400))
            if start + n > length:
                break
            ids[b, start : start + n] = segment
            start, segment = start + n, segment + 1
    return ids


def segment_mask(ids: jax.Array) -> jax.Array:
    """(B, 1, T, T) causal mask inside a segment; padding (0) attends to nothing real."""
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] > 0)
    causal = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))
    return (same & causal)[:, None]


def probe(name: str, dims: tuple[int, ...], rng: np.random.Generator) -> list[dict]:
    """Every path's rows for one shape: errors against the float32 reference, time, or the error."""
    batch, length, heads, kv_heads, dim = dims
    ids_np = segments(rng, batch, length)
    ids = jnp.asarray(ids_np)
    real = np.asarray(ids > 0)[:, :, None, None]
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dim), jnp.bfloat16)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.bfloat16) * real
    scale = dim**-0.5
    mask = segment_mask(ids)
    max_segments = int(ids.max())

    def xla(q, k, v, dtype=jnp.bfloat16):
        q, k, v = (t.astype(dtype) for t in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")

    def layout(bound: int) -> attention.PackedLayout:  # as the model derives it from a batch
        return attention.packed_layout(jnp.asarray(packing.segment_starts(ids_np, bound)))

    def packed(q, k, v, bound=max_segments, mask_type=cudnn.MaskType.PADDING_CAUSAL):
        rows_layout = layout(bound)
        return cudnn.dot_product_attention(
            q,
            k,
            v,
            q_seqlen=rows_layout.lengths,
            kv_seqlen=rows_layout.lengths,
            q_offsets=rows_layout.offsets,
            kv_offsets=rows_layout.offsets,
            scale=scale,
            mask_type=mask_type,
            qkv_layout="BTNH",
        )

    def unpacked_causal(q, k, v):  # the bench's path: one causal sequence per row
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")

    def forward_backward(attend):
        def run(q, k, v):
            out, pullback = jax.vjp(attend, q, k, v)
            return (out, *pullback(cotangent.astype(out.dtype)))

        return jax.jit(run)

    reference = forward_backward(lambda q, k, v: xla(q, k, v, jnp.float32))(q, k, v)
    reference = [np.asarray(t, np.float32) for t in reference]
    candidates = {
        "xla_segment_mask": xla,
        "cudnn_packed_padding_causal": packed,
        "cudnn_packed_causal": lambda q, k, v: packed(q, k, v, mask_type=cudnn.MaskType.CAUSAL),
        "cudnn_packed_bound_T_over_64": lambda q, k, v: packed(q, k, v, bound=length // 64),
        "model_path_row_by_row_32_slots": lambda q, k, v: attention.packed_flash_attention(
            q, k, v, layout(32), scale
        ),
        "cudnn_unpacked_causal": unpacked_causal,
    }
    rows = []
    for label, attend in candidates.items():
        row = {"shape": name, "B_T_H_KV_D": list(dims), "segments_per_row_max": max_segments, "path": label}
        try:
            fn = forward_backward(attend)
            memory = fn.lower(q, k, v).compile().memory_analysis()
            row["temp_mib"] = memory.temp_size_in_bytes / 2**20
            outputs = [np.asarray(t, np.float32) for t in fn(q, k, v)]
            if label != "cudnn_unpacked_causal":  # another mask: no reference
                for tensor, got, want in zip(("out", "dq", "dk", "dv"), outputs, reference, strict=True):
                    err = np.abs((got - want) * real).max() / np.abs(want * real).max()
                    row[f"{tensor}_max_abs_err_over_max"] = float(err)
            jax.block_until_ready(fn(q, k, v))
            start = time.perf_counter()
            for _ in range(20):
                out = fn(q, k, v)
            jax.block_until_ready(out)
            row["ms_forward_backward"] = (time.perf_counter() - start) / 20 * 1e3
        except Exception as error:  # noqa: BLE001 - a probe records what the GPU refuses
            row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    rng = np.random.default_rng(0)
    rows = [row for name, dims in SHAPES.items() for row in probe(name, dims, rng)]
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
    out = os.path.join(os.environ.get("OUT", "experiments/results"), "packed_attention_probe.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
