"""The public entry to the LLaMA-family decoder: the model, random init of named shapes, and
from_pretrained for HF directories and GGUF files.

from_pretrained reads files, so this module stands with io/ in the layers (ARCHITECTURE.md); the
library's own modules import models.decoder, never this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax import sharding
from qlora_jax.io import hf
from qlora_jax.models import frozen as frozen_lib
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.decoder import Llama, attention_implementation
from qlora_jax.models.frozen import Quantization
from qlora_jax.models.presets import preset as named_preset

__all__ = ["Llama", "attention_implementation", "from_pretrained", "random_init"]


def from_pretrained(
    path: str,
    quantization: str | Quantization | None = "nf4",
    dtype: Any = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    offload_embeddings: bool = False,
    offload_head: bool = False,
    **runtime: Any,
) -> tuple[Llama, dict[str, Any]]:
    """(model, frozen tree on the default device, or split over `mesh`) from a HF directory or a
    GGUF file; the embedding tables in pinned host memory with `offload_embeddings`, the output
    head with `offload_head` (frozen.tables_in_host_memory).

    `dtype` is both the compute dtype and the storage dtype of dense weights (embeddings,
    unquantized linears); linears are quantized as they are read. With a mesh each leaf goes
    straight to its shards (sharding.frozen_shardings): no device ever holds the whole base.
    `runtime` overrides LlamaConfig's runtime fields (remat_policy, scan_layers, attention_impl).
    """
    quant = quantization if isinstance(quantization, Quantization) else Quantization(quantization)
    dtype = jnp.dtype(dtype).name
    cfg, frozen = hf.load(path, quant, dtype, dtype=dtype, **runtime)
    placement = _placement(mesh, offload_embeddings, offload_head)
    return Llama(cfg), _device_put_consuming(frozen, None if placement is None else placement(frozen))


def _placement(
    mesh: jax.sharding.Mesh | None, offload_embeddings: bool, offload_head: bool
) -> Callable[[Any], Any] | None:
    """Where each leaf of a frozen tree goes as it is built (None: the default device): its shards
    on `mesh` or the default device, the tables chosen by `offload_embeddings` and `offload_head`
    in pinned host memory (never on the device whole, so they add nothing to the load's peak)."""
    if mesh is None and not (offload_embeddings or offload_head):
        return None

    def shardings(frozen: Any) -> Any:
        if mesh is None:
            placed = sharding.default_shardings(frozen)
        else:
            placed = sharding.frozen_shardings(mesh, frozen)
        return frozen_lib.tables_in_host_memory(placed, offload_embeddings, offload_head)

    return shardings


def _device_put_consuming(host_tree: dict[str, Any], shardings: Any = None) -> Any:
    """Move a host tree to the device (or to `shardings`) leaf by leaf, freeing each host buffer
    once it is copied, so host memory peaks at the tree plus one leaf, not twice the tree."""
    leaves, treedef = jax.tree.flatten(host_tree)
    targets = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    host_tree.clear()
    moved = []
    for i in range(len(leaves)):
        moved.append(jax.block_until_ready(sharding.place(leaves[i], targets[i])))
        leaves[i] = None
    return jax.tree.unflatten(treedef, moved)


def random_init(
    preset: str | LlamaConfig,
    quantization: str | Quantization | None = "nf4",
    dtype: Any = "bfloat16",
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    offload_embeddings: bool = False,
    offload_head: bool = False,
    **runtime: Any,
) -> tuple[Llama, dict[str, Any]]:
    """(model, frozen tree) of a named shape with random weights, built and quantized on device
    (with a mesh: on every device at once, each keeping only its share); tables in pinned host
    memory as from_pretrained places them."""
    quant = quantization if isinstance(quantization, Quantization) else Quantization(quantization)
    dtype = jnp.dtype(dtype).name
    cfg = named_preset(preset) if isinstance(preset, str) else preset
    cfg = cfg.replace(dtype=dtype, **runtime)
    shardings = _placement(mesh, offload_embeddings, offload_head)
    return Llama(cfg), frozen_lib.random_init(cfg, jax.random.key(seed), quant, dtype, shardings=shardings)
