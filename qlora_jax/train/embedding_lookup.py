"""The embedding lookup on the host (model.offload_embeddings): the token table stays in pinned
host memory and each training batch carries its tokens' rows, looked up here with numpy before the
batch goes to the devices, so a step moves B x T rows instead of the whole table (Llama 3 at 2,048
tokens: 16 MiB instead of 1 GiB, ~20 ms a step over PCIe on the compute stream: issue 18)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qlora_jax import sharding


class HostEmbeddingLookup:
    """Adds "embeddings", the rows of batch["inputs"], to host batches when the frozen tree's token
    table is in host memory; passes batches through unchanged when it is on the device. Keeps a
    numpy copy of the table (its size again in host memory, e.g. 1 GiB for Llama 3)."""

    def __init__(self, frozen: dict[str, Any]):
        table = frozen["embed_tokens"]["weight"]
        on_host = table.sharding.memory_kind == "pinned_host"
        self.table = np.asarray(sharding.gather_to_host(table)) if on_host else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.table is None:
            return batch
        return batch | {"embeddings": self.table[batch["inputs"]]}
