"""Random small LLaMA configs: our Flax model vs transformers on the same HF checkpoint (fp32, CPU).

Tolerance 1e-5 relative to the largest logit: both sides compute in float32 with different
summation orders (XLA vs ATen); observed errors are ~1e-6, and a wrong RoPE variant, head
grouping or mask shifts logits by 1e-2 or more.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from qlora_jax import lora as lora_lib
from qlora_jax.models import llama
from qlora_jax.models.config import RopeScaling, to_hf_config
from tests.models.hf_reference import hf_logits, hf_model, rel_err, save, small_config

TOL = 1e-5
ROPES = {
    "default": RopeScaling(),
    "linear": RopeScaling("linear", 2.0),
    "dynamic": RopeScaling("dynamic", 2.0),
    "llama3": RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
}


# one compiled forward per config and shape: eager apply dispatches (and compiles) op by op, slower
# for every new shape than one compile of the whole model
_forward = jax.jit(
    lambda model, frozen, tokens, **kw: model.apply(frozen, None, tokens, **kw), static_argnums=0
)


def _tokens(batch: int, length: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def _load(tmp_path, cfg, **kwargs):
    path = save(hf_model(cfg), tmp_path / "hf", **kwargs)
    model, frozen = llama.from_pretrained(path, quantization=None, dtype="float32")
    return model, frozen


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_variants_match_transformers(tmp_path, rope):
    # max_position_embeddings=16 < 24 tokens, so dynamic NTK actually rescales
    cfg = small_config(rope_scaling=ROPES[rope], max_position_embeddings=16)
    ref = hf_model(cfg)
    model, frozen = llama.from_pretrained(save(ref, tmp_path / "hf"), quantization=None, dtype="float32")
    assert model.config.rope_scaling == cfg.rope_scaling
    tokens = _tokens(2, 24)
    assert rel_err(_forward(model, frozen, tokens), hf_logits(ref, tokens)) < TOL


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("tied", [True, False])
def test_gqa_and_tied_embeddings_match_transformers(tmp_path, heads, kv_heads, tied):
    cfg = small_config(num_heads=heads, num_kv_heads=kv_heads, tie_word_embeddings=tied)
    ref = hf_model(cfg)
    model, frozen = llama.from_pretrained(save(ref, tmp_path / "hf"), quantization=None, dtype="float32")
    assert ("lm_head" in frozen) == (not tied)
    tokens = _tokens(2, 16)
    assert rel_err(_forward(model, frozen, tokens), hf_logits(ref, tokens)) < TOL


def test_biases_and_sharded_checkpoint_match_transformers(tmp_path):
    cfg = small_config(attention_bias=True, mlp_bias=True, head_dim=64)
    ref = hf_model(cfg)
    path = save(ref, tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, frozen = llama.from_pretrained(path, quantization=None, dtype="float32")
    tokens = _tokens(1, 16)
    assert rel_err(_forward(model, frozen, tokens), hf_logits(ref, tokens)) < TOL


def test_left_padding_matches_transformers_on_real_tokens(tmp_path):
    cfg = small_config()
    ref = hf_model(cfg)
    model, frozen = llama.from_pretrained(save(ref, tmp_path / "hf"), quantization=None, dtype="float32")
    tokens = _tokens(3, 12)
    mask = np.ones((3, 12), bool)
    mask[1, :5] = False
    mask[2, :11] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = np.asarray(_forward(model, frozen, tokens, attention_mask=mask))
    theirs = hf_logits(ref, tokens, attention_mask=mask, position_ids=positions)
    assert rel_err(ours[mask], theirs[mask]) < TOL
    # and each padded row equals the same tokens run alone without padding
    alone = np.asarray(_forward(model, frozen, tokens[1:2, 5:]))
    assert rel_err(ours[1, 5:], alone[0]) < TOL


def test_packed_segments_equal_separate_sequences(tmp_path):
    model, frozen = _load(tmp_path, small_config())
    a, b = _tokens(1, 7, seed=1), _tokens(1, 9, seed=2)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 7 + [2] * 9])
    ours = np.asarray(_forward(model, frozen, packed, segment_ids=segments))
    assert rel_err(ours[:, :7], np.asarray(_forward(model, frozen, a))) < TOL
    assert rel_err(ours[:, 7:], np.asarray(_forward(model, frozen, b))) < TOL


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decoding_equals_full_forward(tmp_path, scan_layers):
    model, frozen = _load(tmp_path, small_config(rope_scaling=ROPES["llama3"]))
    model = llama.Llama(model.config.replace(scan_layers=scan_layers))  # how to run: not in the checkpoint
    tokens = _tokens(2, 10)
    full = np.asarray(_forward(model, frozen, tokens))
    cache = model.init_cache(batch=2, max_length=16)
    step_logits = []
    logits, cache = _forward(model, frozen, tokens[:, :6], cache=cache)
    step_logits.append(np.asarray(logits))
    for t in range(6, 10):
        logits, cache = _forward(model, frozen, tokens[:, t : t + 1], cache=cache)
        step_logits.append(np.asarray(logits))
    assert int(cache.index) == 10
    assert rel_err(np.concatenate(step_logits, axis=1), full) < TOL


# compiled, as training runs it (eager dispatch is slower to test); the base model's compile serves
# every variant below
@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grad(model, frozen, tokens):
    return jax.value_and_grad(lambda fr: jnp.mean(model.apply(fr, None, tokens) ** 2))(frozen)


@pytest.mark.parametrize(
    "runtime",
    [
        dict(scan_layers=False),
        dict(scan_layers=False, remat_policy="offload_attention"),
        dict(remat_policy="full"),
        dict(remat_policy="dots_with_no_batch_dims_saveable"),
    ],
)
def test_unrolled_and_remat_variants_compute_the_same_logits_and_grads(tmp_path, runtime):
    model, frozen = _load(tmp_path, small_config())
    variant = llama.Llama(model.config.replace(**runtime))
    tokens = _tokens(2, 8)
    base_loss, base_grad = _loss_and_grad(model, frozen, tokens)
    var_loss, var_grad = _loss_and_grad(variant, frozen, tokens)
    np.testing.assert_allclose(var_loss, base_loss, rtol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(base_grad), jax.tree.leaves(var_grad), strict=True):
        np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-7)


def test_layer_by_layer_offloads_each_layer_input_as_its_own_array(tmp_path):
    """scan_layers=False runs the layers without a loop, so the offload policy moves each layer's
    input to host memory by itself (no stacked host buffer for XLA to slice); the scanned model
    does it once, inside its loop."""
    model, frozen = _load(tmp_path, small_config(num_layers=3))
    tokens = _tokens(2, 8)
    for scan_layers, offloads_outside_a_loop in ((True, 0), (False, 3)):
        variant = llama.Llama(model.config.replace(scan_layers=scan_layers, remat_policy="offload"))
        grad = jax.grad(lambda fr, v=variant: jnp.mean(v.apply(fr, None, tokens) ** 2))
        top_level = jax.make_jaxpr(grad)(frozen).jaxpr.eqns
        to_host = [
            e for e in top_level if e.primitive.name == "device_put" and "host" in str(e.outvars[0].aval)
        ]
        assert len(to_host) == offloads_outside_a_loop
        assert any(e.primitive.name == "scan" for e in top_level) == scan_layers


def test_layer_by_layer_applies_adapter_dropout(tmp_path):
    """Adapter dropout without the scan (each layer draws its own key from the call's): the same
    key gives the same logits again, another key others."""
    model, frozen = _load(tmp_path, small_config())
    model = llama.Llama(model.config.replace(scan_layers=False))
    cfg = lora_lib.LoraConfig(r=4, target_modules="all-linear", dropout=0.5)
    adapters = jax.tree.map(
        lambda x: x + 0.1, lora_lib.init_lora(jax.random.key(0), frozen, model.config, cfg)
    )
    tokens = _tokens(2, 8)

    def logits(key):
        return np.asarray(model.apply(frozen, adapters, tokens, rng=key, lora_dropout=0.5))

    first, again, other = logits(jax.random.key(1)), logits(jax.random.key(1)), logits(jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3 * np.abs(first).max()


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    # bf16 has 8 mantissa bits: logits of a 2-layer model drift by ~1e-2 relative, not more
    ref = hf_model(small_config())
    path = save(ref, tmp_path / "hf")
    model, frozen = llama.from_pretrained(path, quantization=None, dtype="bfloat16")
    assert frozen["layers"]["self_attn"]["q_proj"]["weight"].dtype == jnp.bfloat16
    assert frozen["layers"]["input_layernorm"]["weight"].dtype == jnp.float32
    tokens = _tokens(2, 16)
    logits = _forward(model, frozen, tokens)
    assert logits.dtype == jnp.float32
    assert rel_err(logits, hf_logits(ref, tokens)) < 3e-2


def test_nf4_model_equals_dense_model_on_dequantized_weights(tmp_path):
    ref = hf_model(small_config())
    path = save(ref, tmp_path / "hf")
    model, frozen_q = llama.from_pretrained(path, quantization="nf4", dtype="float32")
    q = frozen_q["layers"]["mlp"]["down_proj"]["weight"]
    assert q.stack_shape == (2,) and q.shape == (128, 192)
    dense = jax.jit(  # one compile, not one per op and weight shape
        lambda fr: jax.tree.map(
            lambda w: w.dequantize() if hasattr(w, "dequantize") else w,
            fr,
            is_leaf=lambda w: hasattr(w, "dequantize"),
        )
    )(frozen_q)
    tokens = _tokens(2, 16)
    assert rel_err(_forward(model, frozen_q, tokens), np.asarray(_forward(model, dense, tokens))) < 1e-6


@pytest.mark.parametrize("padded", [False, True])
def test_mistral_sliding_window_matches_transformers(tmp_path, padded):
    cfg = small_config(sliding_window=4)
    hf_cfg = to_hf_config(cfg)
    assert hf_cfg["model_type"] == "mistral"
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**hf_cfg)).eval()
    model, frozen = llama.from_pretrained(save(ref, tmp_path / "hf"), quantization=None, dtype="float32")
    assert model.config.sliding_window == 4
    tokens = _tokens(2, 12)
    mask = np.ones((2, 12), bool)
    if padded:
        mask[1, :3] = False
    ours = np.asarray(_forward(model, frozen, tokens, attention_mask=mask if padded else None))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    theirs = hf_logits(ref, tokens, attention_mask=mask, position_ids=positions)
    assert rel_err(ours[mask], theirs[mask]) < TOL
