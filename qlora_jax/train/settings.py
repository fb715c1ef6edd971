"""The run's ConfigDict turned into the library's typed configs (one place that reads keys)."""

from __future__ import annotations

import re
from typing import Any

from qlora_jax.data.formats import FormatConfig
from qlora_jax.data.pipeline import BatchingConfig
from qlora_jax.lora import ALL_LINEAR, LoraConfig
from qlora_jax.models.frozen import Quantization
from qlora_jax.sharding import MeshConfig
from qlora_jax.train.optim import OptimConfig

_REGEX_CHARS = re.compile(r"[.*+?^$()\[\]{}|\\]")


def target_modules(spec: str) -> str | tuple[str, ...]:
    """'all-linear', a regex (if it has regex characters), or comma-separated module names."""
    spec = spec.strip()
    if spec == ALL_LINEAR or _REGEX_CHARS.search(spec):
        return spec
    return tuple(name.strip() for name in spec.split(",") if name.strip())


def lora_config(c: Any) -> LoraConfig:
    return LoraConfig(
        r=c.lora.r,
        alpha=float(c.lora.alpha),
        dropout=c.lora.dropout,
        target_modules=target_modules(c.lora.target_modules),
        bias=c.lora.bias,
        use_rslora=c.lora.use_rslora,
        init=c.lora.init,
    )


def optim_config(c: Any) -> OptimConfig:
    o = c.optim
    return OptimConfig(
        lr=o.lr,
        schedule=o.schedule,
        warmup_steps=o.warmup_steps,
        total_steps=c.train.max_steps,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        max_grad_norm=o.max_grad_norm or None,
        accumulation_steps=o.accumulation_steps,
        offload_state=o.offload_state,
    )


def quantization(c: Any) -> Quantization:
    kind = None if c.model.quantization in ("none", "", None) else c.model.quantization
    return Quantization(kind, c.model.block_size, c.model.double_quant)


def format_config(c: Any) -> FormatConfig:
    d = c.data
    return FormatConfig(
        format=d.format,
        prompt_key=d.prompt_key,
        completion_key=d.completion_key,
        text_key=d.text_key,
        messages_key=d.messages_key,
        train_on_prompt=d.train_on_prompt,
    )


def batching_config(c: Any) -> BatchingConfig:
    buckets = tuple(int(b) for b in str(c.data.buckets).split(",") if b.strip())
    return BatchingConfig(
        max_seq_len=c.data.max_seq_len,
        batch_size=c.train.batch_size,
        packing=c.data.packing,
        buckets=buckets,
        accumulation_steps=c.optim.accumulation_steps,
        seed=c.train.seed,
    )


def mesh_config(c: Any) -> MeshConfig:
    return MeshConfig(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor)
