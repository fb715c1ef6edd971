"""RunConfig: the recipe's ConfigDict validated and converted once, at the CLI boundary.

Every module below the CLIs receives only its own typed part (LoraConfig, OptimConfig, MeshConfig,
...), never the ConfigDict. A bad value raises ConfigError naming the key, the value and what is
valid (the CLIs exit with code 2).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str  # HF directory, .gguf file, preset name, or "" (the embedded SmolLM2)
    tokenizer: str  # "" = the model's own
    quantization: Quantization
    dtype: str
    remat_policy: str
    seq_tile: int  # tokens per MLP tile (0: whole sequence)
    dequant_slices: int  # NF4 weights dequantized this many slices at a time (1: whole)
    offload_embeddings: bool  # token (and position) tables in pinned host memory, looked up there
    offload_head: bool  # the output head in pinned host memory, copied in for the loss


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_path: str
    eval_path: str  # "" = hold out eval_fraction of the training rows
    eval_fraction: float
    format: FormatConfig
    batching: BatchingConfig


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    max_steps: int
    log_every: int
    eval_every: int  # 0 = only at the end
    eval_batches: int  # 0 = all
    seed: int
    exact_match_examples: int
    exact_match: str  # exact | last_number
    max_new_tokens: int
    loss_chunk: int
    nonfinite: str  # stop | skip


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every: int  # 0 = off
    keep: int


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    mode: str  # auto | on | off
    coordinator: str
    num_processes: int
    process_id: int


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    prompts: int
    first_steps: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSettings
    lora: LoraConfig
    data: DataSettings
    optim: OptimConfig
    train: TrainSettings
    checkpoint: CheckpointSettings
    mesh: MeshConfig
    distributed: DistributedSettings
    compare: CompareSettings
    output_dir: str
    resume: bool  # continue from the latest checkpoint in output_dir
    overwrite: bool
    recipe_json: str  # the ConfigDict as the user gave it, written to <output_dir>/config.json


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
    "model.seq_tile": _int_at_least(0),
    "model.dequant_slices": _int_at_least(1),
    "model.offload_embeddings": _one_of((True, False)),
    "model.offload_head": _one_of((True, False)),
    "lora.r": _int_at_least(1),
    "lora.alpha": _number(0, _INF, low_open=True),
    "lora.dropout": _number(0, 1),
    "lora.bias": _one_of(BIAS_MODES),
    "lora.init": _one_of(INIT_MODES),
    "data.eval_fraction": _number(0, 1),
    "data.format": _one_of(FORMATS),
    "data.max_seq_len": _int_at_least(2),
    "data.max_segments_per_row": _int_at_least(1),
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


def target_modules(spec: str) -> str | tuple[str, ...]:
    """'all-linear', a regex (if it has regex characters), or comma-separated module names."""
    spec = spec.strip()
    if spec == ALL_LINEAR or _REGEX_CHARS.search(spec):
        return spec
    return tuple(name.strip() for name in spec.split(",") if name.strip())


def validate(c: Any) -> None:
    """Every value's type, range or choice, before anything is loaded: one ConfigError naming it."""
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


def _warmup_within_run(warmup: int, max_steps: int) -> int:
    """Warmup longer than the run is clamped to the run (HF Trainer's behaviour), with a warning."""
    if warmup <= max_steps:
        return warmup
    print(
        f"warning: optim.warmup_steps={warmup} exceeds train.max_steps={max_steps}: warmup clamped to "
        f"{max_steps} steps (the learning rate rises for the whole run)"
    )
    return max_steps


def _same_names(cls: type, group: Any, **derived: Any) -> Any:
    """`cls` with each field read from the recipe group's key of the same name; `derived` gives
    the fields that are computed or come from elsewhere."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
    return cls(**{name: group[name] for name in names}, **derived)


def parse(c: Any) -> RunConfig:
    """The recipe's ConfigDict, validated, as a frozen RunConfig (ConfigError on a bad value)."""
    validate(c)
    m, d, t, o = c.model, c.data, c.train, c.optim
    quant_type = None if m.quantization in ("none", "", None) else m.quantization
    return RunConfig(
        model=_same_names(
            ModelSettings, m, quantization=Quantization(quant_type, m.block_size, m.double_quant)
        ),
        lora=LoraConfig(
            r=c.lora.r,
            alpha=float(c.lora.alpha),
            dropout=c.lora.dropout,
            target_modules=target_modules(c.lora.target_modules),
            bias=c.lora.bias,
            use_rslora=c.lora.use_rslora,
            init=c.lora.init,
        ),
        data=_same_names(
            DataSettings,
            d,
            format=_same_names(FormatConfig, d),
            batching=BatchingConfig(
                max_seq_len=d.max_seq_len,
                batch_size=t.batch_size,
                packing=d.packing,
                max_segments_per_row=d.max_segments_per_row,
                buckets=tuple(int(b) for b in str(d.buckets).split(",") if b.strip()),
                accumulation_steps=o.accumulation_steps,
                seed=t.seed,
            ),
        ),
        optim=_same_names(
            OptimConfig,
            o,
            warmup_steps=_warmup_within_run(o.warmup_steps, t.max_steps),
            total_steps=t.max_steps,
            max_grad_norm=o.max_grad_norm or None,
        ),
        train=_same_names(TrainSettings, t),
        checkpoint=_same_names(CheckpointSettings, c.checkpoint),
        mesh=_same_names(MeshConfig, c.mesh),
        distributed=_same_names(DistributedSettings, c.distributed),
        compare=_same_names(CompareSettings, c.compare),
        output_dir=c.output_dir,
        resume=c.resume == "auto",
        overwrite=c.overwrite,
        recipe_json=c.to_json_best_effort(indent=2),
    )


def check_against_model(run: RunConfig, model_cfg: LlamaConfig) -> None:
    """Checks that need the architecture (config.json / GGUF metadata), before any weight is read."""
    limit = model_cfg.max_position_embeddings
    max_seq_len = run.data.batching.max_seq_len
    if max_seq_len > limit:
        raise ConfigError(
            f"data.max_seq_len={max_seq_len}: above the model's max_position_embeddings={limit}; "
            f"valid: 2..{limit}"
        )
    try:
        targeted_modules(model_cfg, run.lora)
    except ValueError as err:
        raise ConfigError(f"lora.{err}") from None
    quant = run.model.quantization
    if quant.quant_type is None:
        return
    for (group, name), (out_dim, in_dim) in linear_shapes(model_cfg).items():
        if (size := out_dim * in_dim) % quant.block_size:
            raise ConfigError(
                f"model.block_size={quant.block_size}: {group}.{name} weight ({out_dim}, {in_dim}) has "
                f"{size} elements, not a multiple of it; valid: a block size in {BLOCK_SIZES} dividing "
                "every linear weight, or model.quantization='none'"
            )
