"""LoRA adapters with peft's semantics: config, target matching, init, trainable counts, merge.

The adapter tree mirrors the frozen tree's stacked layout. For each targeted projection:
  lora["layers"]["self_attn"]["q_proj"] = {"a": (L, in, r), "b": (L, r, out), "scale": (L,)}
(+ "bias" (L, out) when biases train; with bias="all" a LayerNorm's bias trains too, as in peft:
lora["layers"]["input_layernorm"] = {"bias": (L, D)}, lora["norm"] = {"bias": (D,)}). `scale` is
alpha/r (or alpha/sqrt(r) with rsLoRA) per layer: a constant carried with its adapter, never
trained (`trainable_mask` excludes it). Layers
left out by layers_to_transform, and ranks below the stack's largest (rank_pattern), are zero
padding: A and B are zero there, so their gradients are exactly zero and they stay zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.frozen import has_bias, hf_name, linear_shapes, tree_name
from qlora_jax.models.linear import dense_weight
from qlora_jax.quant.nf4 import NF4Tensor

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian")
ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")  # peft's default: the number after any "<name>."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """peft.LoraConfig's knobs under the same meaning (peft's name in brackets where it differs)."""

    r: int = 8
    alpha: float = 8.0  # [lora_alpha]
    dropout: float = 0.0  # [lora_dropout]
    target_modules: str | tuple[str, ...] | None = None  # names, a regex, or "all-linear"
    bias: str = "none"
    use_rslora: bool = False
    init: str = "default"  # [init_lora_weights]: True -> "default", "gaussian"
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list | tuple | set):  # a set of names, as in peft
            object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        elif self.layers_to_transform is not None:
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRA bias {self.bias!r} unknown; valid: {BIAS_MODES}")
        if self.init not in INIT_MODES:
            raise ValueError(f"LoRA init {self.init!r} unknown; valid: {INIT_MODES}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; give module names, a regex, or 'all-linear'")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform needs target_modules as a list of names, not {self.target_modules!r} "
                "(peft refuses the combination too)"
            )

    def rank_for(self, module: str) -> int:
        return int(self.rank_pattern[key]) if (key := _pattern_key(self.rank_pattern, module)) else self.r

    def scale_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key else self.alpha
        rank = self.rank_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """peft's rule: the first pattern that equals the module name or matches a dotted suffix of it."""
    for key in patterns:
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def decoder_prefix(cfg: LlamaConfig) -> str:
    """Where peft finds the decoder layers: model.layers of a *ForCausalLM, or the text decoder of
    a multimodal checkpoint (Gemma3ForConditionalGeneration's model.language_model.layers)."""
    return "model.language_model." if cfg.text_of_multimodal else "model."


def module_names(cfg: LlamaConfig) -> list[str]:
    """Every linear module of the model under the names peft sees in its *ForCausalLM (Phi-3's fused
    qkv_proj and gate_up_proj are one module each, GPT-2's transformer.h.N.attn.c_attn, ...; Qwen3's
    q_norm/k_norm are not linear, so "all-linear" leaves them out as peft does), or in the multimodal
    model whose text decoder it is."""
    names = [module_name(cfg, i, g, n) for i in range(cfg.num_layers) for g, n in linear_shapes(cfg)]
    return names + ["lm_head"]


def module_name(cfg: LlamaConfig, layer: int, group: str, proj: str) -> str:
    """peft's name of the tree's module layers/group/proj of one layer."""
    return peft_name(cfg, f"model.layers.{layer}.{group}.{proj}")


def peft_name(cfg: LlamaConfig, name: str) -> str:
    """peft's name of a tree module name "model.…": the family's HF name (GPT-2's
    transformer.h.N.…), or the multimodal model's whose text decoder it is (decoder_prefix)."""
    if cfg.text_of_multimodal:
        return decoder_prefix(cfg) + name.removeprefix("model.")
    return hf_name(cfg.model_type, name)


def _is_target(cfg: LoraConfig, name: str) -> bool:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        matched = name != "lm_head"
    elif isinstance(targets, str):
        matched = re.fullmatch(targets, name) is not None
    else:
        matched = any(name == t or name.endswith(f".{t}") for t in targets)
    if matched and cfg.layers_to_transform is not None:
        index = _LAYER_INDEX.match(name)
        matched = index is not None and int(index.group(1)) in cfg.layers_to_transform
    return matched


def targeted_modules(model_cfg: LlamaConfig, cfg: LoraConfig) -> list[str]:
    """Names of the modules that get adapters; errors name the modules that exist."""
    names = module_names(model_cfg)
    matched = [n for n in names if _is_target(cfg, n)]
    if not matched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"target_modules={cfg.target_modules!r} (layers_to_transform={cfg.layers_to_transform}) "
            f"matches no module; available: {kinds} (full names like {names[0]!r}) or 'all-linear'"
        )
    if "lm_head" in matched:
        raise ValueError(
            f"target_modules={cfg.target_modules!r} selects lm_head: LoRA on lm_head is not supported; "
            "target the decoder projections"
        )
    return matched


def split_module_name(cfg: LlamaConfig, name: str) -> tuple[int, str, str]:
    """(layer, group, proj) in the tree of a module name from module_names."""
    *_, layer, group, proj = tree_name(cfg.model_type, name).split(".")
    return int(layer), group, proj


def init_lora(rng: jax.Array, frozen: Any, model_cfg: LlamaConfig, cfg: LoraConfig) -> dict[str, Any]:
    """A fresh adapter tree: A as peft (kaiming-uniform a=sqrt(5), or N(0, 1/r)), B zero.

    Biases train only with bias="all" (every existing bias) or "lora_only" (biases of targeted
    modules); they start from the frozen values.
    """
    targets = targeted_modules(model_cfg, cfg)
    shapes = linear_shapes(model_cfg)
    by_proj: dict[tuple[str, str], list[str]] = {}
    for name in targets:
        _, group, proj = split_module_name(model_cfg, name)
        by_proj.setdefault((group, proj), []).append(name)
    num_layers = model_cfg.num_layers
    tree: dict[str, Any] = {}
    for (group, proj), names in by_proj.items():
        out_dim, in_dim = shapes[(group, proj)]
        r_max = max(cfg.rank_for(n) for n in names)
        a = np.zeros((num_layers, in_dim, r_max), np.float32)
        b = np.zeros((num_layers, r_max, out_dim), np.float32)
        scale = np.zeros((num_layers,), np.float32)
        for name in names:
            layer = split_module_name(model_cfg, name)[0]
            rank = cfg.rank_for(name)
            key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
            if cfg.init == "gaussian":  # peft: normal(std=1/r) on A
                a_rank = jax.random.normal(key, (rank, in_dim), jnp.float32) / rank
            else:  # torch kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
                bound = 1.0 / math.sqrt(in_dim)
                a_rank = jax.random.uniform(key, (rank, in_dim), jnp.float32, -bound, bound)
            a[layer, :, :rank] = np.asarray(a_rank).T
            scale[layer] = cfg.scale_for(name)
        tree.setdefault(group, {})[proj] = {"a": a, "b": b, "scale": scale}
    _add_trainable_biases(tree, frozen, cfg)
    lora = {"layers": tree}
    if cfg.bias == "all" and "bias" in frozen["norm"]:  # the final LayerNorm's (GPT-2's ln_f)
        lora["norm"] = {"bias": np.asarray(frozen["norm"]["bias"], np.float32)}
    return jax.device_put(lora)


def _add_trainable_biases(tree: dict[str, Any], frozen: Any, cfg: LoraConfig) -> None:
    """Linear biases (bias="all": every one; "lora_only": the targeted modules'), and with "all"
    the per-layer LayerNorm biases, as peft marks every parameter named *.bias trainable."""
    if cfg.bias == "none":
        return
    for group, modules in frozen["layers"].items():
        if "weight" in modules:  # a per-layer norm
            if cfg.bias == "all" and "bias" in modules:
                tree[group] = {"bias": np.asarray(modules["bias"], np.float32)}
            continue
        for proj, params in modules.items():
            if "bias" not in params:
                continue
            if cfg.bias == "all" or proj in tree.get(group, {}):
                tree.setdefault(group, {}).setdefault(proj, {})["bias"] = np.asarray(
                    params["bias"], np.float32
                )


def is_norm_bias(node: Any) -> bool:
    """Whether a node of the adapter tree is a norm's trained bias ({"bias": array}), not a group of
    adapted projections."""
    return "bias" in node and not isinstance(node["bias"], dict)


def trained_biases(model_cfg: LlamaConfig, lora: Any) -> list[tuple[str, tuple[str, ...], int | None]]:
    """(peft module name, path of its node in the adapter tree, layer or None) of every trained bias."""
    out = []
    for group, modules in lora["layers"].items():
        if is_norm_bias(modules):
            for layer in range(model_cfg.num_layers):
                out.append((peft_name(model_cfg, f"model.layers.{layer}.{group}"), ("layers", group), layer))
            continue
        for proj, adapter in modules.items():
            if "bias" in adapter:
                for layer in range(model_cfg.num_layers):
                    out.append((module_name(model_cfg, layer, group, proj), ("layers", group, proj), layer))
    if "norm" in lora:
        out.append((peft_name(model_cfg, "model.norm"), ("norm",), None))
    return out


def trainable_mask(lora: Any) -> Any:
    """True for leaves that train (A, B, biases), False for the per-layer scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", lora)


def count_parameters(model_cfg: LlamaConfig, cfg: LoraConfig) -> tuple[int, int]:
    """(trainable, all) exactly as peft's get_nb_trainable_parameters counts them.

    Padding from layers_to_transform or rank_pattern is not counted: only the real A (r x in)
    and B (out x r) of each targeted module, plus trainable biases.
    """
    shapes = linear_shapes(model_cfg)
    targets = targeted_modules(model_cfg, cfg)
    adapters = 0
    for name in targets:
        out_dim, in_dim = shapes[split_module_name(model_cfg, name)[1:]]
        adapters += cfg.rank_for(name) * (in_dim + out_dim)
    biases = 0
    if cfg.bias != "none":
        candidates = targets if cfg.bias == "lora_only" else module_names(model_cfg)[:-1]
        projs = [split_module_name(model_cfg, n)[1:] for n in candidates]
        biases = sum(shapes[p][0] for p in projs if has_bias(model_cfg, *p))
    if cfg.bias == "all" and model_cfg.norm_type == "layernorm":  # two per layer and the final one
        biases += (2 * model_cfg.num_layers + 1) * model_cfg.hidden_size
    return adapters + biases, model_cfg.num_params + adapters


def trainable_parameters_line(model_cfg: LlamaConfig, cfg: LoraConfig) -> str:
    """peft's print_trainable_parameters line, with the same numbers."""
    trainable, total = count_parameters(model_cfg, cfg)
    percent = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def lora_delta(adapter: Mapping[str, Any], dtype: Any = jnp.float32) -> jax.Array:
    """(L, out, in) weight change scale * (A @ B)^T of one stacked adapter."""
    a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
    delta = jnp.einsum("lir,lro->loi", a, b) * adapter["scale"][:, None, None]
    return delta.astype(dtype)


def merge(frozen: Any, lora: Any, dtype: Any = None) -> Any:
    """The frozen tree with adapters folded in: W' = W + scale * (A @ B)^T, dense in `dtype`.

    NF4 weights of adapted modules are dequantized (the merged weight is no longer 4-bit);
    trained biases replace the frozen ones.
    """
    return _fold(frozen, lora, dtype, sign=1.0)


def unmerge(merged: Any, lora: Any, dtype: Any = None) -> Any:
    """Inverse of `merge` on dense weights: W = W' - scale * (A @ B)^T."""
    return _fold(merged, lora, dtype, sign=-1.0)


def _fold(frozen: Any, lora: Any, dtype: Any, sign: float) -> Any:
    out = jax.tree.map(lambda x: x, frozen, is_leaf=lambda x: isinstance(x, NF4Tensor))
    if "norm" in lora and sign > 0:  # trained LayerNorm biases replace the frozen ones
        out["norm"] = out["norm"] | {"bias": lora["norm"]["bias"].astype(out["norm"]["bias"].dtype)}
    for group, modules in lora["layers"].items():
        if is_norm_bias(modules):
            if sign > 0:
                bias = modules["bias"].astype(out["layers"][group]["bias"].dtype)
                out["layers"][group] = out["layers"][group] | {"bias": bias}
            continue
        for proj, adapter in modules.items():
            params = dict(out["layers"][group][proj])
            if "a" in adapter:
                w = params["weight"]
                dense = dense_weight(w, jnp.float32)
                params["weight"] = (dense + sign * lora_delta(adapter)).astype(jnp.dtype(dtype or w.dtype))
            if "bias" in adapter and sign > 0:
                params["bias"] = adapter["bias"].astype(params["bias"].dtype)
            out["layers"][group] = dict(out["layers"][group]) | {proj: params}
    return out
