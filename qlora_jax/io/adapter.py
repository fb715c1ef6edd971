"""The run's adapter directory: PEFT files for peft/transformers and an Orbax copy for qlora_jax."""

from __future__ import annotations

import os
from typing import Any

import jax

from qlora_jax.io import checkpoint, peft
from qlora_jax.lora import LoraConfig
from qlora_jax.models.config import LlamaConfig


def export_adapter(
    directory: str, lora: Any, lora_cfg: LoraConfig, model_cfg: LlamaConfig, base_path: str, fingerprint: str
) -> None:
    """<directory>: PEFT files (adapter_model.safetensors, adapter_config.json) and orbax/.

    `lora` on the host (numpy); multi-process runs call it on every process, the first writes the
    PEFT files and Orbax coordinates its own checkpoint."""
    if jax.process_index() == 0:
        peft.save_adapter(directory, lora, lora_cfg, model_cfg, base_path)
    checkpoint.save_adapter_orbax(
        os.path.join(directory, "orbax"),
        lora,
        peft.peft_config_dict(lora_cfg, base_path),
        base_path,
        fingerprint,
    )
