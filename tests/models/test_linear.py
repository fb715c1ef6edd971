"""The LoRA branch's custom VJP against plain autodiff of the same expression, the frozen product
dequantized in slices against the whole weight, and their memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models.linear import frozen_matmul, lora_delta
from qlora_jax.quant import nf4


def _reference(h, a, b, scale):
    """The expression autodiff would see (peft's order: ((h A) B) * scale), in float64."""
    return (h @ a) @ b * scale


def _inputs(dtype, tokens=64, d_in=48, d_out=80, r=8):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, tokens, d_in))
    a = rng.standard_normal((d_in, r)) / np.sqrt(d_in)
    b = rng.standard_normal((r, d_out)) / np.sqrt(r)
    dy = rng.standard_normal((2, tokens, d_out))
    return h, a, b, dy, jnp.asarray(h, dtype), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


@pytest.mark.parametrize(
    "dtype, rtol",
    [
        # float32 end to end: only summation order differs from float64
        (jnp.float32, 1e-5),
        # bfloat16 activations and cotangents (8-bit mantissa, 2**-8 = 3.9e-3 per rounding, a few
        # roundings in series); dA, dB still accumulate in float32
        (jnp.bfloat16, 3e-2),
    ],
)
def test_lora_delta_value_and_grads_match_float64(dtype, rtol):
    h64, a64, b64, dy64, h, a, b = _inputs(dtype)
    scale = jnp.float32(0.5)
    out, vjp = jax.vjp(lambda h, a, b: lora_delta(h, a, b, scale), h, a, b)
    dh, da, db = vjp(jnp.asarray(dy64, dtype))
    assert out.dtype == dtype and dh.dtype == dtype and da.dtype == db.dtype == jnp.float32

    with jax.enable_x64():
        want_out, want_vjp = jax.vjp(lambda h, a, b: _reference(h, a, b, 0.5), h64, a64, b64)
        want = (want_out, *want_vjp(dy64))
    for got, ref in zip((out, dh, da, db), want, strict=True):
        ref = np.asarray(ref)
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        assert err < rtol, err


def _float32_arrays_of_shape(jaxpr, shape) -> int:
    """How many equations (sub-jaxprs included) produce a float32 array of `shape`."""
    count = 0
    for eqn in jaxpr.eqns:
        count += sum(v.aval.shape == shape and v.aval.dtype == jnp.float32 for v in eqn.outvars)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            count += _float32_arrays_of_shape(sub, shape)
    return count


def test_lora_delta_backward_makes_no_float32_token_by_feature_array():
    """Autodiff of the float32-accumulated expression turns the bf16 (tokens, d_out) cotangent
    into a float32 copy (86 MiB per MLP projection at 2048 tokens of Llama-2-7B, seen in XLA's
    GPU buffer assignment); the custom backward hands XLA no such array. Checked on the jaxpr
    because the CPU backend upcasts bf16 matmuls anyway, so its memory analysis cannot tell."""
    tokens, d_in, d_out, r = 32, 24, 40, 4
    h = jnp.zeros((tokens, d_in), jnp.bfloat16)
    a, b = jnp.zeros((d_in, r)), jnp.zeros((r, d_out))
    dy = jnp.zeros((tokens, d_out), jnp.bfloat16)
    scale = jnp.float32(2.0)

    def autodiff_expression(h, a, b):
        u = jnp.einsum("ti,ir->tr", h, a.astype(h.dtype), preferred_element_type=jnp.float32)
        out = jnp.einsum(
            "tr,ro->to", u.astype(h.dtype), b.astype(h.dtype), preferred_element_type=jnp.float32
        )
        return (out * scale).astype(h.dtype)

    def backward_count(fn):
        vjp = jax.vjp(fn, h, a, b)[1]
        return _float32_arrays_of_shape(jax.make_jaxpr(vjp)(dy).jaxpr, (tokens, d_out))

    assert backward_count(autodiff_expression) > 0  # the check can see the array when it exists
    assert backward_count(lambda h, a, b: lora_delta(h, a, b, scale)) == 0


def _nf4_weight(out_features, in_features):
    w = np.random.default_rng(1).standard_normal((out_features, in_features)).astype(np.float32)
    return nf4.quantize(jnp.asarray(w))


@pytest.mark.parametrize("slices", [2, 4, 3])  # 3 divides neither 128 rows nor 256 / 64 columns
def test_frozen_matmul_in_slices_equals_the_whole_weight(slices):
    """Each output (forward) and input gradient (backward) element is the same dot product over
    the same dequantized values, whether the weight is decoded whole or a slice at a time; only
    XLA's blocking of the sums may differ. float32 sums of 128-256 products of unit-variance
    terms (results up to ~50): rtol 1e-6 with atol 2e-5 for elements near 0 (observed 5.7e-6)."""
    weight = _nf4_weight(128, 256)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 256)), jnp.float32)
    dy = jnp.asarray(np.random.default_rng(3).standard_normal((3, 5, 128)), jnp.float32)
    results = {}
    for pieces in (1, slices):
        y, vjp = jax.vjp(lambda x, p=pieces: frozen_matmul(x, weight, p), x)
        results[pieces] = (y, vjp(dy)[0])
    for whole, sliced in zip(results[1], results[slices], strict=True):
        np.testing.assert_allclose(sliced, whole, rtol=1e-6, atol=2e-5)


def test_dequantizing_in_slices_keeps_only_a_slice_of_the_weight_alive():
    """Backward of a (4096, 4096) NF4 product at 16 tokens: whole, XLA's temp holds the 32 MiB
    bfloat16 weight; in 8 slices, about an eighth of it."""
    weight = jax.eval_shape(lambda: _nf4_weight(4096, 4096))
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)

    def temp_bytes(slices):
        def loss_grad(x, weight):
            return jax.grad(lambda x: jnp.sum(frozen_matmul(x, weight, slices).astype(jnp.float32)))(x)

        return jax.jit(loss_grad).lower(x, weight).compile().memory_analysis().temp_size_in_bytes

    whole_weight = 4096 * 4096 * 2
    whole, sliced = temp_bytes(1), temp_bytes(8)
    assert whole >= whole_weight
    assert sliced < whole - whole_weight / 2
