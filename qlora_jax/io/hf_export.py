"""HF exports that transformers loads (config.json, sharded model safetensors + index, tokenizer
files): the merged model (the dequantized base with the adapters folded in), and the 4-bit base in
the bitsandbytes format (as loaded or quantized by us, or merged and requantized)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlora_jax import lora as lora_lib
from qlora_jax.io import bnb4bit
from qlora_jax.io.safetensors_stream import write
from qlora_jax.models.config import LlamaConfig, to_hf_config
from qlora_jax.models.frozen import Quantization, hf_name, is_conv1d, layer_norms, linear_shapes, norm_params
from qlora_jax.quant.nf4 import NF4Tensor, dequantize, quantize

STORE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def merged_weights(frozen: Any, lora: Any | None, dtype: str = "bfloat16") -> dict[str, Any]:
    """The frozen tree with every linear dense (dequantized) and the adapters merged, in `dtype`."""
    tree = lora_lib.merge(frozen, lora, dtype) if lora else frozen

    def dense(x: Any) -> Any:
        return dequantize(x, dtype) if isinstance(x, NF4Tensor) else x

    return jax.tree.map(dense, tree, is_leaf=lambda x: isinstance(x, NF4Tensor))


# compiled once per weight shape: run op by op, quantizing a 135M model took ~40 s on 2 CPUs
_quantize = jax.jit(quantize, static_argnums=(1, 2, 3))


@functools.partial(jax.jit, static_argnums=1)
def _requantization_sums(w: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Squared error of one weight quantized to NF4 and back, and its squared norm."""
    back = dequantize(quantize(w, block_size), jnp.float32)
    return jnp.sum((back - w) ** 2), jnp.sum(w**2)


def requantization_error(cfg: LlamaConfig, merged: dict[str, Any], block_size: int = 64) -> float:
    """RMS error of re-quantizing the merged linears to NF4, relative to their RMS (what it adds)."""
    err = ref = 0.0
    for group, name in linear_shapes(cfg):
        w = jnp.asarray(merged["layers"][group][name]["weight"], jnp.float32)
        for i in range(w.shape[0]):
            layer_err, layer_ref = _requantization_sums(w[i], block_size)
            err += float(layer_err)
            ref += float(layer_ref)
    return float(np.sqrt(err / ref))


def _hf_tensors(tree: dict[str, Any], cfg: LlamaConfig, dtype: str):
    """(HF name, numpy tensor) of every weight, layer by layer, under the family's names: dense
    leaves in `dtype` (GPT-2's Conv1D weights as (in, out)), NF4 linears as the tensors
    bitsandbytes saves for them."""
    store = STORE_DTYPES[dtype]

    def arr(x: Any) -> np.ndarray:
        return np.asarray(jnp.asarray(x, jnp.float32)).astype(store)

    def tensors(name: str, w: Any) -> dict[str, np.ndarray]:
        """`name` in the tree's naming; a 4-bit weight is written as bitsandbytes quantized it, (out, in)."""
        family_name = hf_name(cfg.model_type, name)
        if isinstance(w, NF4Tensor):
            return bnb4bit.linear_tensors(family_name, w)
        return {family_name: np.ascontiguousarray(arr(w).T if is_conv1d(cfg.model_type, name) else arr(w))}

    yield from tensors("model.embed_tokens.weight", tree["embed_tokens"]["weight"]).items()
    if cfg.position_embedding == "learned":
        yield from tensors("model.embed_positions.weight", tree["embed_positions"]["weight"]).items()
    for i in range(cfg.num_layers):
        layer = {}
        for path in layer_norms(cfg):
            node = tree["layers"]
            for part in path:
                node = node[part]
            for param in norm_params(cfg):
                layer |= tensors(f"model.layers.{i}.{'.'.join(path)}.{param}", node[param][i])
        for group, name in linear_shapes(cfg):
            params = jax.tree.map(lambda x, i=i: x[i], tree["layers"][group][name])
            layer |= tensors(f"model.layers.{i}.{group}.{name}.weight", params["weight"])
            if "bias" in params:
                layer |= tensors(f"model.layers.{i}.{group}.{name}.bias", params["bias"])
        yield from layer.items()
    for param in norm_params(cfg):
        yield from tensors(f"model.norm.{param}", tree["norm"][param]).items()
    if not cfg.tie_word_embeddings:
        yield from tensors("lm_head.weight", tree["lm_head"]["weight"]).items()


def _write(
    directory: str, tensors: Any, hf_config: dict[str, Any], tokenizer: Any, shard_bytes: int
) -> dict[str, Any]:
    """Shards of about `shard_bytes` (+ index when several), config.json and the tokenizer."""
    os.makedirs(directory, exist_ok=True)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = total = 0
    for name, tensor in tensors:
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
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"files": files, "bytes": total}


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
    merged = merged_weights(frozen, lora, "float32")
    hf_config = to_hf_config(cfg) | {"torch_dtype": dtype}
    return _write(directory, _hf_tensors(merged, cfg, dtype), hf_config, tokenizer, shard_bytes)


def requantized(cfg: LlamaConfig, merged: dict[str, Any], quant: Quantization) -> dict[str, Any]:
    """The merged tree with every per-layer linear quantized again (layer by layer) as `quant`."""
    layers = {group: dict(modules) for group, modules in merged["layers"].items()}
    for group, name in linear_shapes(cfg):
        params = dict(layers[group][name])
        w = jnp.asarray(params["weight"], jnp.float32)
        stacked = [
            jax.device_get(_quantize(w[i], quant.block_size, quant.double_quant, quant.quant_type))
            for i in range(w.shape[0])
        ]
        params["weight"] = jax.tree.map(lambda *leaves: np.stack(leaves), *stacked)
        layers[group][name] = params
    return merged | {"layers": layers}


def save_bnb4bit(
    directory: str,
    cfg: LlamaConfig,
    tree: Any,
    tokenizer: Any = None,
    dtype: str = "bfloat16",
    shard_bytes: int = 2 * 2**30,
) -> dict[str, Any]:
    """Write a 4-bit base (the frozen tree, or a merged tree `requantized`) in the bitsandbytes
    format that `AutoModelForCausalLM.from_pretrained` loads: NF4 linears byte for byte as they
    are in `tree`, dense tensors in `dtype` (also the compute dtype in the config)."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"bnb4bit dtype {dtype!r} unknown; valid: {sorted(STORE_DTYPES)}")
    linears = [tree["layers"][group][name]["weight"] for group, name in linear_shapes(cfg)]
    if not all(isinstance(w, NF4Tensor) for w in linears):
        raise ValueError(
            "the base is not stored in 4 bits (quantization none): export --format merged instead"
        )
    first = linears[0]
    quant = Quantization(first.quant_type, first.block_size, first.double_quant)
    # transformers keeps the output head in 16 bits unless told to skip nothing ([] quantizes it)
    skip = [] if isinstance(tree.get("lm_head", {}).get("weight"), NF4Tensor) else None
    hf_config = to_hf_config(cfg) | {
        "torch_dtype": dtype,
        "quantization_config": bnb4bit.config_entry(quant, dtype, skip),
    }
    return _write(directory, _hf_tensors(tree, cfg, dtype), hf_config, tokenizer, shard_bytes)
