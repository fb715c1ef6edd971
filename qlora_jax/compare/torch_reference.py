"""transformers + peft (+ bitsandbytes NF4) models that share weights and adapters with ours."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import bitsandbytes as bnb
import jax
import numpy as np
import peft
import torch
import transformers

from qlora_jax import lora as lora_lib
from qlora_jax.models.config import LlamaConfig, from_hf_config, to_hf_config
from qlora_jax.models.frozen import hf_name, is_conv1d, linear_shapes, tree_name
from qlora_jax.quant import nf4


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


def _model_config(hf_model) -> LlamaConfig:
    return from_hf_config(hf_model.config.to_dict())


def _decoder_linears(hf_model) -> Iterator[tuple[int, str, str, str]]:
    """(layer, group, name, module path) of every decoder projection of a transformers model, by
    the tree's (group, name) (GPT-2's transformer.h.0.attn.c_attn is ("self_attn", "c_attn"))."""
    cfg = _model_config(hf_model)
    for layer in range(cfg.num_layers):
        for group, name in linear_shapes(cfg):
            yield layer, group, name, hf_name(cfg.model_type, f"model.layers.{layer}.{group}.{name}")


def adapter_modules(peft_model) -> Iterator[tuple[int, str, str, Any]]:
    """(layer, group, name, peft LoRA module) for every adapted decoder projection."""
    causal_lm = peft_model.base_model.model
    for layer, group, name, path in _decoder_linears(causal_lm):
        module = causal_lm.get_submodule(path)
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            yield layer, group, name, module


def copy_adapters_into(lora: dict, peft_model) -> dict:
    """Our adapter tree with peft's A (r, in) and B (out, r) copied in (transposed)."""
    lora = jax.tree.map(np.array, lora)
    for layer, group, name, module in adapter_modules(peft_model):
        entry = lora["layers"][group][name]
        a = module.lora_A["default"].weight.detach().float().numpy()
        b = module.lora_B["default"].weight.detach().float().numpy()
        entry["a"][layer] = 0.0
        entry["b"][layer] = 0.0
        entry["a"][layer, :, : a.shape[0]] = a.T
        entry["b"][layer, : b.shape[1], :] = b.T
        np.testing.assert_allclose(entry["scale"][layer], module.scaling["default"], rtol=1e-7)
    return lora


def _frozen_tensor(frozen: dict, model_type: str, name: str) -> np.ndarray:
    """The tensor of `frozen` (dense) under its transformers name, e.g. model.layers.3.mlp.up_proj.weight
    (GPT-2's Conv1D weights transposed to their (in, out))."""
    ours = tree_name(model_type, name)
    parts = ours.split(".")
    if parts[0] == "lm_head":
        return np.asarray(frozen["lm_head"]["weight"])
    if parts[1] != "layers":  # model.embed_tokens.weight, model.norm.weight, model.norm.bias
        return np.asarray(frozen[parts[1]][parts[2]])
    node = frozen["layers"]
    for part in parts[3:]:
        node = node[part]
    tensor = np.asarray(node[int(parts[2])])
    return tensor.T if is_conv1d(model_type, ours) else tensor


def hf_config(model_cfg: LlamaConfig) -> transformers.PretrainedConfig:
    """The transformers config of model_cfg's family (LlamaConfig, Qwen2Config, ...), without
    dropout (GPT-2's default 0.1 would make torch's training steps random; ours has none)."""
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(model_cfg))
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(hf_cfg, key):
            setattr(hf_cfg, key, 0.0)
    return hf_cfg


def hf_model_from_frozen(model_cfg: LlamaConfig, frozen: dict) -> transformers.PreTrainedModel:
    """A float32 transformers model of model_cfg's family holding exactly the weights of a dense
    (unquantized) frozen tree."""
    hf_cfg = hf_config(model_cfg)
    hf_cfg.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
            tensor = _frozen_tensor(frozen, model_cfg.model_type, name)
            param.copy_(torch.from_numpy(np.ascontiguousarray(tensor, np.float32)))
    return model


def quantize_with_bnb(
    hf_model,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> None:
    """Replace the decoder linears of a transformers model, in place, by bitsandbytes 4-bit layers
    (a Conv1D's (in, out) weight transposed first, as transformers' bitsandbytes integration does)."""
    for *_, path in _decoder_linears(hf_model):
        child = hf_model.get_submodule(path)
        weight_OxI = (
            child.weight.data.T if isinstance(child, transformers.pytorch_utils.Conv1D) else child.weight.data
        )
        q = bnb.nn.Linear4bit(
            weight_OxI.shape[1],
            weight_OxI.shape[0],
            bias=child.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        q.weight = bnb.nn.Params4bit(
            weight_OxI.contiguous().clone(),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        # bitsandbytes' CPU inference path repacks the weight in place on the first eval-mode
        # forward, and matmuls with the repacked weight then pass no gradient to the input
        q.support_avx512bf16_for_cpu = False
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(hf_model.get_submodule(parent), name, q.to("cpu"))


def frozen_from_bnb(frozen: dict, hf_model) -> dict:
    """Our frozen tree with each decoder linear taken from the bitsandbytes modules' own states."""
    frozen = jax.tree.map(np.asarray, frozen, is_leaf=lambda x: isinstance(x, nf4.NF4Tensor))
    per_layer: dict[tuple[str, str], list[nf4.NF4Tensor]] = {}
    for _, group, name, path in _decoder_linears(hf_model):
        module = hf_model.get_submodule(path)
        state = module.weight.quant_state.as_dict(packed=False) | {"weight": module.weight.data.numpy()}
        per_layer.setdefault((group, name), []).append(nf4.NF4Tensor.from_bnb(state))
    for (group, name), weights in per_layer.items():
        frozen["layers"][group][name]["weight"] = jax.tree.map(lambda *xs: np.stack(xs), *weights)
    return frozen
