"""The run's ConfigDict turned into the library's typed configs (one place that reads keys)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from qlora_jax.data.formats import FORMATS, FormatConfig
from qlora_jax.data.pipeline import BatchingConfig
from qlora_jax.lora import ALL_LINEAR, BIAS_MODES, INIT_MODES, LoraConfig, targeted_modules
from qlora_jax.models.config import REMAT_POLICIES, LlamaConfig
from qlora_jax.models.frozen import Quantization, linear_shapes
from qlora_jax.quant.nf4 import BLOCK_SIZES
from qlora_jax.sharding import MeshConfig
from qlora_jax.train.optim import SCHEDULES, OptimConfig

_REGEX_CHARS = re.compile(r"[.*+?^$()\[\]{}|\\]")


class ConfigError(ValueError):
    """A config value out of range or not among the valid choices (the CLI exits with code 2)."""


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
        f"must be an integer >= {low}",
    )


def _number(low: float, high: float, low_open: bool = False, high_open: bool = True):
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return ok, f"must be a number in {interval}"


def _one_of(choices: tuple[Any, ...]) -> tuple[Callable[[Any], bool], str]:
    return lambda v: v in choices, f"valid: {', '.join(repr(x) for x in choices)}"


_INF = float("inf")
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.quantization": _one_of(("nf4", "fp4", "none")),
    "model.block_size": _one_of(BLOCK_SIZES),
    "model.dtype": _one_of(("bfloat16", "float16", "float32")),
    "model.remat_policy": _one_of(REMAT_POLICIES),
    "lora.r": _int_at_least(1),
    "lora.alpha": _number(0, _INF, low_open=True),
    "lora.dropout": _number(0, 1),
    "lora.bias": _one_of(BIAS_MODES),
    "lora.init": _one_of(INIT_MODES),
    "data.eval_fraction": _number(0, 1),
    "data.format": _one_of(FORMATS),
    "data.max_seq_len": _int_at_least(2),
    "train.batch_size": _int_at_least(1),
    "train.max_steps": _int_at_least(1),
    "train.log_every": _int_at_least(1),
    "train.eval_every": _int_at_least(0),
    "train.eval_batches": _int_at_least(0),
    "train.exact_match_examples": _int_at_least(0),
    "train.exact_match": _one_of(("exact", "last_number")),
    "train.max_new_tokens": _int_at_least(1),
    "train.loss_chunk": _int_at_least(1),
    "train.nonfinite": _one_of(("stop", "skip")),
    "optim.lr": _number(0, _INF, low_open=True),
    "optim.schedule": _one_of(SCHEDULES),
    "optim.warmup_steps": _int_at_least(0),
    "optim.weight_decay": _number(0, _INF),
    "optim.b1": _number(0, 1),
    "optim.b2": _number(0, 1),
    "optim.eps": _number(0, _INF, low_open=True),
    "optim.max_grad_norm": _number(0, _INF),
    "optim.accumulation_steps": _int_at_least(1),
    "checkpoint.every": _int_at_least(0),
    "checkpoint.keep": _int_at_least(1),
    "resume": _one_of(("", "auto")),
}


def _value(c: Any, key: str) -> Any:
    for part in key.split("."):
        c = c[part]
    return c


def validate(c: Any) -> None:
    """Check every value's type, range or choice before anything is loaded: one ConfigError naming it."""
    for key, (ok, valid) in RULES.items():
        value = _value(c, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: {valid}")
    spec = target_modules(c.lora.target_modules)
    if not spec:
        raise ConfigError(
            f"lora.target_modules={c.lora.target_modules!r}: give module names, a regex or 'all-linear'"
        )
    if isinstance(spec, str) and spec != ALL_LINEAR:
        try:
            re.compile(spec)
        except re.error as err:
            raise ConfigError(f"lora.target_modules={spec!r}: not a valid regex ({err})") from None


def validate_for_model(c: Any, model_cfg: LlamaConfig) -> None:
    """Checks that need the model's architecture (known from config.json / GGUF metadata, before weights)."""
    limit = model_cfg.max_position_embeddings
    if c.data.max_seq_len > limit:
        raise ConfigError(
            f"data.max_seq_len={c.data.max_seq_len}: above the model's max_position_embeddings={limit}; "
            f"valid: 2..{limit}"
        )
    try:
        targeted_modules(model_cfg, lora_config(c))
    except ValueError as err:
        raise ConfigError(f"lora.{err}") from None
    if quantization(c).quant_type is None:
        return
    block = c.model.block_size
    for (group, name), (out_dim, in_dim) in linear_shapes(model_cfg).items():
        if (size := out_dim * in_dim) % block:
            raise ConfigError(
                f"model.block_size={block}: {group}.{name} weight ({out_dim}, {in_dim}) has {size} "
                f"elements, not a multiple of it; valid: a block size in {BLOCK_SIZES} dividing every "
                "linear weight, or model.quantization='none'"
            )


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
