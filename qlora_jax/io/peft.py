"""PEFT-format adapters: adapter_model.safetensors + adapter_config.json, as peft writes and reads them.

Keys are peft's for a *ForCausalLM of any supported family without the adapter name, e.g.
"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (r, in) and "...lora_B.weight"
(out, r) (Phi-3: its fused qkv_proj and gate_up_proj; GPT-2:
"base_model.model.transformer.h.3.attn.c_attn...", the same shapes: peft adapts its Conv1D layers
with fan_in_fan_out=True, which the config says);
trained biases are "...q_proj.base_layer.bias" where LoRA wraps the module and "...q_proj.bias"
where it does not (bias="all" on an untargeted module). Ranks below the stack's padding are cut on
export and padded again on import, so a round trip is exact. The text decoder of a multimodal
Gemma 3 checkpoint is keyed as peft keys Gemma3ForConditionalGeneration
("base_model.model.model.language_model.layers...."), "all-linear" written as the regex of its
text decoder's linears (peft's own "all-linear" there would add the vision tower's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from qlora_jax.io.safetensors_stream import SafetensorsFile, write
from qlora_jax.lora import (
    ALL_LINEAR,
    LoraConfig,
    init_lora,
    split_module_name,
    targeted_modules,
    trained_biases,
)
from qlora_jax.models.config import LlamaConfig

PREFIX = "base_model.model."
# "all-linear" of a multimodal checkpoint's text decoder (peft matches a string with re.fullmatch)
TEXT_DECODER_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def peft_config_dict(cfg: LoraConfig, base_model: str = "") -> dict[str, Any]:
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": True if cfg.init == "default" else cfg.init,
        "layers_to_transform": None if cfg.layers_to_transform is None else list(cfg.layers_to_transform),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def lora_config_from_peft(d: dict[str, Any]) -> LoraConfig:
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter peft_type {d.get('peft_type')!r} is not supported; valid: 'LORA'")
    targets = d["target_modules"]
    init = d.get("init_lora_weights", True)
    return LoraConfig(
        r=int(d["r"]),
        alpha=float(d["lora_alpha"]),
        dropout=float(d.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        bias=d.get("bias", "none"),
        use_rslora=bool(d.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "default",
        layers_to_transform=d.get("layers_to_transform"),
        rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {},
    )


def _bias_key(module: str, targeted: list[str]) -> str:
    """peft's key of a trained bias: under `base_layer` where LoRA wraps the module."""
    return f"{PREFIX}{module}.base_layer.bias" if module in targeted else f"{PREFIX}{module}.bias"


def save_adapter(
    directory: str, lora: Any, cfg: LoraConfig, model_cfg: LlamaConfig, base_model: str = ""
) -> None:
    """Write `lora` in PEFT format (float32 tensors)."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    targeted = targeted_modules(model_cfg, cfg)
    for name in targeted:
        layer, group, proj = split_module_name(model_cfg, name)
        adapter = lora["layers"][group][proj]
        rank = cfg.rank_for(name)
        a = np.asarray(adapter["a"][layer], np.float32)[:, :rank]
        b = np.asarray(adapter["b"][layer], np.float32)[:rank, :]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    for module, path, layer in trained_biases(model_cfg, lora):
        bias = _node(lora, path)["bias"]
        tensors[_bias_key(module, targeted)] = np.asarray(bias if layer is None else bias[layer], np.float32)
    write(os.path.join(directory, WEIGHTS_FILE), tensors, metadata={"format": "pt"})
    if model_cfg.text_of_multimodal and cfg.target_modules == ALL_LINEAR:
        cfg = dataclasses.replace(cfg, target_modules=TEXT_DECODER_LINEARS)
    # peft adapts a Conv1D (GPT-2) with fan_in_fan_out=True and writes so in the config
    config = peft_config_dict(cfg, base_model) | {"fan_in_fan_out": model_cfg.model_type == "gpt2"}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(directory: str, frozen: Any, model_cfg: LlamaConfig) -> tuple[Any, LoraConfig]:
    """(lora tree, LoraConfig) from a PEFT adapter directory, for this model's shape."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    with open(config_path) as f:
        peft_dict = json.load(f)
    cfg = lora_config_from_peft(peft_dict)
    if peft_dict.get("fan_in_fan_out") and model_cfg.model_type != "gpt2":
        raise ValueError(
            f"{config_path}: fan_in_fan_out=True is for Conv1D layers (GPT-2); this {model_cfg.model_type} "
            "model's linears are nn.Linear, as peft would refuse too"
        )
    weights = SafetensorsFile(os.path.join(directory, WEIGHTS_FILE))
    names = set(weights.names())
    # the adapter tree's shapes and scales; A and B of every targeted module are set below
    tree = jax.tree.map(np.array, init_lora(jax.random.key(0), frozen, model_cfg, cfg))
    targeted = targeted_modules(model_cfg, cfg)
    for name in targeted:
        i, group, proj = split_module_name(model_cfg, name)
        a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        if a_key not in names or b_key not in names:
            raise KeyError(
                f"{directory}: adapter has no {a_key!r} / {b_key!r} although its config targets {name}"
            )
        a, b = weights.read(a_key).astype(np.float32), weights.read(b_key).astype(np.float32)
        adapter = tree["layers"][group][proj]
        if a.shape[1] != adapter["a"].shape[1] or b.shape[0] != adapter["b"].shape[2]:
            raise ValueError(f"{directory}: {name} has A {a.shape} / B {b.shape}, not shaped for this model")
        adapter["a"][i] = 0.0
        adapter["b"][i] = 0.0
        adapter["a"][i, :, : a.shape[0]] = a.T
        adapter["b"][i, : b.shape[1], :] = b.T
    for module, path, layer in trained_biases(model_cfg, tree):
        if (key := _bias_key(module, targeted)) in names:
            node = _node(tree, path)
            if layer is None:
                node["bias"] = weights.read(key).astype(np.float32)
            else:
                node["bias"][layer] = weights.read(key)
    return tree, cfg


def _node(tree: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree
