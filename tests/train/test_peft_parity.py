"""Loss, every LoRA gradient and 10 AdamW steps against peft + torch.optim.AdamW (CPU, fp32, dropout 0);
loss and gradients for each family (LLaMA, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3, GPT-2) on
bitsandbytes' own NF4 codes (Phi-3: one A/B pair on each fused qkv_proj and gate_up_proj, as peft
puts them; Gemma 2's loss through its final-logit soft-cap on both sides; GPT-2's Conv1D weights
quantized transposed, as transformers' bitsandbytes integration does).

Tolerances: loss 1e-5 relative, gradients 2e-5 of their largest (float32 on both sides, different
summation order; observed ~1e-6, Gemma 3's MLP up to 1.01e-5 on one CPU, where torch's float32
kernels sum in another order than on the machine that set 1e-5); weights after 10 AdamW steps
1e-4 relative (Adam divides by sqrt(v), which amplifies float32 noise in tiny gradients).
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch

from qlora_jax import lora as lora_lib
from qlora_jax.compare import torch_side
from qlora_jax.compare.torch_reference import (
    copy_adapters_into,
    frozen_from_bnb,
    peft_config,
    quantize_with_bnb,
)
from qlora_jax.models import llama
from qlora_jax.models.frozen import linear_shapes
from qlora_jax.train import step as step_lib
from qlora_jax.train.optim import OptimConfig, make_optimizer
from tests.models.hf_reference import family_config, hf_model, save
from tests.peft_reference import peft_adapters, peft_grads, randomize_b

# "c_proj" (GPT-2) matches attn.c_proj and mlp.c_proj both, as peft's suffix rule does
LORA = lora_lib.LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2, "c_proj": 2})


def _batch(seed=0, batch=2, length=12, vocab=256):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    labels = ids.copy()
    labels[:, :4] = -100  # prompt tokens out of the loss
    labels[1, -2:] = -100
    ours = {
        "inputs": ids.astype(np.int32),
        "targets": np.roll(ids, -1, axis=1).astype(np.int32),
        "loss_mask": np.concatenate([labels[:, 1:] != -100, np.zeros((batch, 1), bool)], axis=1),
    }
    return ids, labels, ours


def _setup(tmp_path, nf4: bool, family: str = "llama"):
    model_cfg = family_config(family)
    ref = hf_model(model_cfg)
    model, frozen = llama.from_pretrained(
        save(ref, tmp_path / "hf"), quantization="nf4" if nf4 else None, dtype="float32"
    )
    if nf4:
        quantize_with_bnb(ref)
        frozen = frozen_from_bnb(frozen, ref)  # both sides use bitsandbytes' own 4-bit weights
    peft_model = peft.get_peft_model(ref, peft_config(LORA))
    randomize_b(peft_model)
    tree = lora_lib.init_lora(jax.random.key(0), frozen, model.config, LORA)
    return model, frozen, peft_model, copy_adapters_into(tree, peft_model)


def _torch_loss(peft_model, ids, labels):
    return peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss


@pytest.mark.parametrize(
    ("family", "nf4"),
    [
        ("llama", False),
        ("llama", True),
        ("qwen2", True),
        ("qwen3", True),
        ("phi3", True),
        ("gemma2", True),
        ("gemma3", True),
        ("gpt2", True),
    ],
    ids=[
        "llama-fp32-base",
        "llama-nf4-base",
        "qwen2-nf4-base",
        "qwen3-nf4-base",
        "phi3-nf4-base",
        "gemma2-nf4-base",
        "gemma3-nf4-base",
        "gpt2-nf4-base",
    ],
)
def test_loss_and_every_lora_gradient_match_peft(tmp_path, family, nf4):
    model, frozen, peft_model, tree = _setup(tmp_path, nf4, family)
    ids, labels, batch = _batch()
    loss_ref = _torch_loss(peft_model, ids, labels)
    loss_ref.backward()
    loss, _, grads = step_lib.mean_loss_and_grads(model, LORA, tree, frozen, batch, None, 1, 1024)
    np.testing.assert_allclose(loss, loss_ref.item(), rtol=1e-5)
    # the compare CLI's torch loss (its own masks, soft-cap and sliding windows) is peft's too
    one_segment = {
        "segment_ids": np.ones_like(ids),
        "positions": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
    }
    with torch.no_grad():
        summed, count = torch_side.loss_sum(peft_model, batch | one_segment)
    np.testing.assert_allclose(summed.item() / count, loss_ref.item(), rtol=1e-5)
    checked = 0
    for (layer, group, name), (ga, gb) in peft_grads(peft_model).items():
        g = grads["layers"][group][name]
        r = ga.shape[1]
        for ours, ref in ((np.asarray(g["a"][layer, :, :r]), ga), (np.asarray(g["b"][layer, :r]), gb)):
            assert np.abs(ours - ref).max() <= 2e-5 * np.abs(ref).max(), (layer, group, name)
            checked += 1
    assert checked == 2 * len(linear_shapes(model.config)) * 2  # A and B of every projection in 2 layers


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32-base", "nf4-base"])
def test_ten_adamw_steps_match_torch(tmp_path, nf4):
    model, frozen, peft_model, tree = _setup(tmp_path, nf4)
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.01, max_grad_norm=0.3)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    optimizer = make_optimizer(optim_cfg)
    opt_state = optimizer.init(tree)
    train_step = step_lib.make_train_step(model, LORA, optim_cfg, optimizer)
    frozen_before = jax.tree.map(np.array, frozen)
    for i in range(10):
        ids, labels, batch = _batch(seed=i)
        torch_opt.zero_grad()
        _torch_loss(peft_model, ids, labels).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        torch_opt.step()
        tree, opt_state, metrics = train_step(tree, opt_state, frozen, batch, None)
    for (layer, group, name), (a_ref, b_ref) in peft_adapters(peft_model).items():
        r = a_ref.shape[1]
        a = np.asarray(tree["layers"][group][name]["a"][layer, :, :r])
        b = np.asarray(tree["layers"][group][name]["b"][layer, :r])
        np.testing.assert_allclose(a, a_ref, rtol=1e-4, atol=1e-4 * np.abs(a_ref).max())
        np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-4 * np.abs(b_ref).max())
    # rank padding (o_proj has r=2 inside a stack of r=4) stayed exactly zero
    assert np.all(np.asarray(tree["layers"]["self_attn"]["o_proj"]["a"][:, :, 2:]) == 0)
    # the frozen base is bitwise unchanged
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))
