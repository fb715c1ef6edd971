"""peft (PyTorch) models that share weights with ours, for parity tests."""

from __future__ import annotations

import bitsandbytes as bnb
import jax
import numpy as np
import peft
import torch

from qlora_jax import lora as lora_lib
from qlora_jax.quant import nf4

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def peft_config(cfg: lora_lib.LoraConfig) -> peft.LoraConfig:
    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        layers_to_transform=None if cfg.layers_to_transform is None else list(cfg.layers_to_transform),
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
    )


def _adapter_modules(peft_model):
    for layer_index, layer in enumerate(peft_model.base_model.model.model.layers):
        for group, names in GROUPS.items():
            for name in names:
                module = getattr(getattr(layer, group), name)
                if hasattr(module, "lora_A") and "default" in module.lora_A:
                    yield layer_index, group, name, module


def randomize_b(peft_model, seed: int = 0) -> None:
    """peft starts B at zero; give it values so every A and B gradient is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, module in _adapter_modules(peft_model):
            b = module.lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def copy_adapters_into(lora: dict, peft_model) -> dict:
    """Our adapter tree with peft's A (r, in) and B (out, r) copied in (transposed)."""
    lora = jax.tree.map(np.array, lora)
    for layer, group, name, module in _adapter_modules(peft_model):
        entry = lora["layers"][group][name]
        a = module.lora_A["default"].weight.detach().numpy()
        b = module.lora_B["default"].weight.detach().numpy()
        entry["a"][layer] = 0.0
        entry["b"][layer] = 0.0
        entry["a"][layer, :, : a.shape[0]] = a.T
        entry["b"][layer, : b.shape[1], :] = b.T
        np.testing.assert_allclose(entry["scale"][layer], module.scaling["default"], rtol=1e-7)
    return lora


def peft_grads(peft_model) -> dict:
    """{(layer, group, name): (dA as (in, r), dB as (r, out))} after a backward pass."""
    return {
        (layer, group, name): (
            module.lora_A["default"].weight.grad.numpy().T,
            module.lora_B["default"].weight.grad.numpy().T,
        )
        for layer, group, name, module in _adapter_modules(peft_model)
    }


def peft_adapters(peft_model) -> dict:
    return {
        (layer, group, name): (
            module.lora_A["default"].weight.detach().numpy().T,
            module.lora_B["default"].weight.detach().numpy().T,
        )
        for layer, group, name, module in _adapter_modules(peft_model)
    }


def quantize_with_bnb(hf_model) -> None:
    """Replace the decoder linears of a transformers model, in place, by bitsandbytes NF4 (DQ)."""
    for layer in hf_model.model.layers:
        for group, names in GROUPS.items():
            parent = getattr(layer, group)
            for name in names:
                child = getattr(parent, name)
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, q.to("cpu"))


def frozen_from_bnb(frozen: dict, hf_model) -> dict:
    """Our frozen tree with each decoder linear taken from the bitsandbytes modules' own states."""
    frozen = jax.tree.map(np.asarray, frozen, is_leaf=lambda x: isinstance(x, nf4.NF4Tensor))
    for group, names in GROUPS.items():
        for name in names:
            per_layer = []
            for layer in hf_model.model.layers:
                weight = getattr(getattr(layer, group), name).weight
                state = weight.quant_state.as_dict(packed=False) | {"weight": weight.data.numpy()}
                per_layer.append(nf4.NF4Tensor.from_bnb(state))
            frozen["layers"][group][name]["weight"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
    return frozen
