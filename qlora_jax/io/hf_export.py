"""Merged export: the dequantized base with the adapters folded in, as a HF safetensors directory
that transformers loads (config.json, sharded model safetensors + index, tokenizer files)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlora_jax import lora as lora_lib
from qlora_jax.io.safetensors_stream import write
from qlora_jax.models.config import LlamaConfig, to_hf_config
from qlora_jax.models.frozen import LINEARS, layer_norms
from qlora_jax.quant.nf4 import NF4Tensor, dequantize, quantize

STORE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def merged_weights(frozen: Any, lora: Any | None, dtype: str = "bfloat16") -> dict[str, Any]:
    """The frozen tree with every linear dense (dequantized) and the adapters merged, in `dtype`."""
    tree = lora_lib.merge(frozen, lora, dtype) if lora else frozen

    def dense(x: Any) -> Any:
        return dequantize(x, dtype) if isinstance(x, NF4Tensor) else x

    return jax.tree.map(dense, tree, is_leaf=lambda x: isinstance(x, NF4Tensor))


def requantization_error(merged: dict[str, Any], block_size: int = 64) -> float:
    """RMS error of re-quantizing the merged linears to NF4, relative to their RMS (what it adds)."""
    err = ref = 0.0
    for group, names in LINEARS.items():
        for name in names:
            w = jnp.asarray(merged["layers"][group][name]["weight"], jnp.float32)
            for i in range(w.shape[0]):
                back = dequantize(quantize(w[i], block_size), jnp.float32)
                err += float(jnp.sum((back - w[i]) ** 2))
                ref += float(jnp.sum(w[i] ** 2))
    return float(np.sqrt(err / ref))


def _hf_tensors(merged: dict[str, Any], cfg: LlamaConfig, dtype: str):
    store = STORE_DTYPES[dtype]

    def arr(x: Any) -> np.ndarray:
        return np.asarray(jnp.asarray(x, jnp.float32)).astype(store)

    yield "model.embed_tokens.weight", arr(merged["embed_tokens"]["weight"])
    for i in range(cfg.num_layers):
        layer = {}
        for path in layer_norms(cfg):
            node = merged["layers"]
            for part in path:
                node = node[part]
            layer[f"model.layers.{i}.{'.'.join(path)}.weight"] = arr(node["weight"][i])
        for group, names in LINEARS.items():
            for name in names:
                params = merged["layers"][group][name]
                layer[f"model.layers.{i}.{group}.{name}.weight"] = arr(params["weight"][i])
                if "bias" in params:
                    layer[f"model.layers.{i}.{group}.{name}.bias"] = arr(params["bias"][i])
        yield from layer.items()
    yield "model.norm.weight", arr(merged["norm"]["weight"])
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", arr(merged["lm_head"]["weight"])


def save_merged(
    directory: str,
    cfg: LlamaConfig,
    frozen: Any,
    lora: Any | None,
    tokenizer: Any = None,
    dtype: str = "bfloat16",
    shard_bytes: int = 2 * 2**30,
) -> dict[str, Any]:
    """Write the merged model; returns {"files": [...], "bytes": n}. Shards of about `shard_bytes`."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"merged dtype {dtype!r} unknown; valid: {sorted(STORE_DTYPES)}")
    os.makedirs(directory, exist_ok=True)
    merged = merged_weights(frozen, lora, "float32")
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = total = 0
    for name, tensor in _hf_tensors(merged, cfg, dtype):
        if size and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += tensor.nbytes
        total += tensor.nbytes
    weight_map = {}
    files = []
    for k, shard in enumerate(shards):
        file = (
            "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        write(os.path.join(directory, file), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((n for n, _ in shard), file))
        files.append(file)
    if len(shards) > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg) | {"torch_dtype": dtype}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"files": files, "bytes": total}
