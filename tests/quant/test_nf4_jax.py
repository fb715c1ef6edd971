"""NF4Tensor as a JAX citizen: jit/vmap/scan, sizes, input errors, and float64 properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_jax.quant import codebooks, nf4

# One compiled program per size: eager dispatch compiles each op for each new size (~3 s a size,
# jit ~1 s). test_jit_matches_eager holds eager and jit to the same bits; the tests of other
# properties quantize through these (those of eager dispatch itself call nf4.quantize).
QUANTIZE = jax.jit(nf4.quantize, static_argnames=("block_size", "double_quant", "quant_type"))
DEQUANTIZE = jax.jit(nf4.dequantize)
STACKED_QUANTIZE = jax.jit(jax.vmap(nf4.quantize))


def _w(shape, seed=0, dtype=jnp.bfloat16):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.02, dtype)


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def test_pytree_leaves_and_static_metadata():
    q = QUANTIZE(_w((128, 256)))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    assert [leaf.shape for leaf in leaves] == [(128 * 128,), (512,), (2,), ()]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.shape == (128, 256) and rebuilt.dtype == "bfloat16" and rebuilt.quant_type == "nf4"
    plain = QUANTIZE(_w((128, 256)), double_quant=False)
    assert len(jax.tree_util.tree_leaves(plain)) == 2  # nested_absmax / offset are None


def test_jit_matches_eager():
    w = _w((256, 192), seed=1)
    eager = nf4.quantize(w)
    jitted = jax.jit(nf4.quantize)(w)
    assert _leaves_equal(eager, jitted)
    assert np.array_equal(jax.jit(nf4.dequantize)(jitted), eager.dequantize())


def test_jit_keeps_the_subnormal_scale_of_a_short_all_zero_nested_block():
    """A one-block tensor: absmax - offset is 0, and bitsandbytes stores the nested scale as 1e-38.
    XLA once rewrote our select into max(), which flushed it to 0 under jit (a hypothesis find)."""
    w = np.ones(64, np.float32)
    tiny = np.float32(1e-38).view(np.uint32)
    for q in (nf4.quantize(w), jax.jit(nf4.quantize)(w)):
        assert np.asarray(q.nested_absmax).view(np.uint32).tolist() == [tiny]


def test_vmap_over_stacked_layers_equals_per_layer():
    w_LxOxI = _w((4, 128, 64), seed=2)
    stacked = STACKED_QUANTIZE(w_LxOxI)
    assert stacked.shape == (128, 64) and stacked.stack_shape == (4,)
    for layer in range(4):
        single = QUANTIZE(w_LxOxI[layer])
        assert _leaves_equal(jax.tree_util.tree_map(lambda x, i=layer: x[i], stacked), single)
    # dequantize handles the stack axis directly and under vmap
    direct = stacked.dequantize()
    assert direct.shape == (4, 128, 64)
    assert np.array_equal(direct, jax.vmap(nf4.dequantize)(stacked))


def test_scan_over_stacked_layers():
    w_LxOxI = _w((3, 64, 128), seed=3)
    stacked = STACKED_QUANTIZE(w_LxOxI)
    x = jnp.ones((2, 128), jnp.bfloat16)

    def layer(carry, q):
        return carry, carry @ q.dequantize().T

    _, outs = jax.lax.scan(layer, x, stacked)
    expected = jnp.stack([x @ QUANTIZE(w_LxOxI[i]).dequantize().T for i in range(3)])
    assert np.array_equal(outs, expected)


def test_bits_per_param():
    """4 + 8/64 + 32/(64*256) = 4.127 with double quantization; 4 + 32/64 = 4.5 without."""
    w = _w((4096, 4096))
    dq, plain = QUANTIZE(w), QUANTIZE(w, double_quant=False)
    assert dq.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert round(dq.bits_per_param, 3) == 4.127
    assert plain.bits_per_param == 4.5
    assert plain.nbytes == w.size // 2 + 4 * w.size // 64


def test_default_dtype_round_trip_and_override():
    q = QUANTIZE(_w((64, 64), dtype=jnp.float16))
    assert q.dequantize().dtype == jnp.float16
    assert q.dequantize(jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize(
    "bad, kwargs, message",
    [
        (np.zeros((3, 30), np.float32), {}, r"shape \(3, 30\).*multiple of block_size=64"),
        (np.zeros((64,), np.int32), {}, r"shape \(64,\) and dtype int32.*float32, bfloat16 and float16"),
        (np.full((2, 64), np.nan, np.float32), {}, r"shape \(2, 64\).*NaN or inf"),
        (np.array([np.inf] + [0.0] * 63, np.float32), {}, r"shape \(64,\).*NaN or inf"),
        (np.zeros((64,), np.float32), {"block_size": 48}, r"block_size 48 is not one of"),
        (np.zeros((64,), np.float32), {"quant_type": "int4"}, r"quant_type 'int4' is not one of"),
        (np.zeros((0,), np.float32), {}, r"positive multiple"),
    ],
)
def test_bad_input_raises_clear_error(bad, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize(bad, **kwargs)


def test_from_bnb_rejects_bad_states():
    state = QUANTIZE(_w((64, 64))).to_bnb()
    with pytest.raises(ValueError, match="holds 4096 codes, shape"):
        nf4.NF4Tensor.from_bnb(state, shape=(64, 128))
    with pytest.raises(ValueError, match="nested_quant_map differs"):
        nf4.NF4Tensor.from_bnb({**state, "nested_quant_map": np.linspace(-1, 1, 256)})
    with pytest.raises(ValueError, match=r"lacks \['absmax'\]"):
        nf4.NF4Tensor.from_bnb({k: v for k, v in state.items() if k != "absmax"})
    with pytest.raises(ValueError, match="to_bnb needs one tensor"):
        STACKED_QUANTIZE(_w((2, 64, 64))).to_bnb()


def test_from_bnb_to_bnb_round_trip_is_identity():
    q = QUANTIZE(_w((320, 192), seed=4))
    again = nf4.NF4Tensor.from_bnb(q.to_bnb())
    assert _leaves_equal(q, again) and again.shape == q.shape and again.dtype == q.dtype


@settings(max_examples=25, deadline=None)
@given(
    n_blocks=st.integers(1, 300),
    log_scale=st.floats(-8, 8),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_error_bound_and_idempotence(n_blocks, log_scale, quant_type, seed):
    """float64 reference: each value lands on its nearest code times its block's absmax, so the
    error is at most half the widest gap between codes (plus float32 rounding, 1e-6 relative);
    re-quantizing dequantized values (no DQ) reproduces the same values (and NF4 codes)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(n_blocks * 64) * 10.0**log_scale).astype(np.float32)
    q = QUANTIZE(w, double_quant=False, quant_type=quant_type)
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax.astype(np.float32))
    code = np.sort(codebooks.CODES_4BIT[quant_type].astype(np.float64))
    half_gap = np.max(np.diff(code)) / 2
    err = np.abs(np.asarray(DEQUANTIZE(q), np.float64).reshape(-1, 64) - w.reshape(-1, 64))
    assert np.all(err <= absmax[:, None] * (half_gap + 1e-6))
    # nearest code, in float64
    scaled = w.reshape(-1, 64) / np.where(absmax > 0, absmax, 1)[:, None]
    best = np.min(np.abs(scaled[..., None] - code), axis=-1)
    got = np.asarray(DEQUANTIZE(q), np.float64).reshape(-1, 64) / np.where(absmax > 0, absmax, 1)[:, None]
    assert np.all(np.abs(scaled - got) <= best + 1e-6)
    again = QUANTIZE(DEQUANTIZE(q), double_quant=False, quant_type=quant_type)
    assert np.array_equal(DEQUANTIZE(again), DEQUANTIZE(q))
    if quant_type == "nf4":  # FP4 has two codes for zero (bitsandbytes sends small positives to 8)
        assert _leaves_equal(q, again)


def test_double_quant_scale_error_is_small():
    """The 8-bit dynamic map keeps block scales within 1% (QLoRA reports no quality loss)."""
    w = _w((1024, 1024), seed=5, dtype=jnp.float32)
    exact = QUANTIZE(w, double_quant=False).absmax
    rebuilt = nf4.block_absmax(QUANTIZE(w))
    assert float(jnp.max(jnp.abs(rebuilt - exact) / exact)) < 0.01
    assert math.isclose(float(jnp.mean(rebuilt)), float(jnp.mean(exact)), rel_tol=1e-3)


def test_fixed_order_mean_is_one_value_in_every_compile_context():
    """The double-quant offset must not depend on how XLA compiles the reduction: on an H100 the
    jnp.mean offset of llama2-7b's random init changed with the autotuning level
    (experiments/results/fingerprint_probe.json). Eager, jit, jit of vmap and a lax.map fused
    with other work (random_init's path) must give the same bits, within 1 ulp of the correctly
    rounded float32 mean (float64 reference): the sum is compensated, the reciprocal and the
    product round once each."""
    bits = lambda v: np.asarray(v, np.float32).view(np.uint32)  # noqa: E731
    rng = np.random.default_rng(0)
    for n in (1, 3, 4096, 100_003):
        x = jnp.asarray(rng.gamma(2.0, 0.01, n) * 10 ** rng.uniform(-3, 3), jnp.float32)
        reference = nf4.fixed_order_mean(x)
        in_jit = jax.jit(nf4.fixed_order_mean)(x)
        in_vmap = jax.jit(jax.vmap(nf4.fixed_order_mean))(jnp.stack([x, x]))
        fused = jax.jit(lambda k, x=x: jax.lax.map(lambda _: nf4.fixed_order_mean(jnp.abs(x) * 1.0), k))(
            jnp.arange(2)
        )
        assert bits(in_jit) == bits(reference)
        assert (bits(in_vmap) == bits(reference)).all() and (bits(fused) == bits(reference)).all()
        exact = np.float32(np.mean(np.asarray(x, np.float64)))
        assert abs(int(bits(reference)) - int(bits(exact))) <= 1
