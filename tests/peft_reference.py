"""Test-only helpers around peft models built by qlora_jax.compare.torch_reference."""

from __future__ import annotations

import torch

from qlora_jax.compare.torch_reference import adapter_modules


def randomize_b(peft_model, seed: int = 0) -> None:
    """peft starts B at zero; give it values so every A and B gradient is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, module in adapter_modules(peft_model):
            b = module.lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def peft_grads(peft_model) -> dict:
    """{(layer, group, name): (dA as (in, r), dB as (r, out))} after a backward pass."""
    return {
        (layer, group, name): (
            module.lora_A["default"].weight.grad.numpy().T,
            module.lora_B["default"].weight.grad.numpy().T,
        )
        for layer, group, name, module in adapter_modules(peft_model)
    }


def peft_adapters(peft_model) -> dict:
    return {
        (layer, group, name): (
            module.lora_A["default"].weight.detach().numpy().T,
            module.lora_B["default"].weight.detach().numpy().T,
        )
        for layer, group, name, module in adapter_modules(peft_model)
    }
