"""NF4/FP4 + double quantization against bitsandbytes on CPU, compared bit for bit.

Every comparison here is exact (bitwise on float32 views): the point of the format is that
bytes and scales are interchangeable with bitsandbytes. The single tolerance is on the double-
quantization offset, bitsandbytes' `torch.mean` of the absmax values, whose float32 rounding
depends on torch's reduction order (and thread count); there we allow 4 ulp and then feed
bitsandbytes' own offset in to check the rest of the pipeline bitwise.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes import functional as bnbF
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_jax.quant import codebooks, nf4
from tests.quant.bnb_reference import (
    bits,
    bnb_dequantize,
    bnb_quantize,
    bnb_reference_quantize_blockwise,
)

DTYPES = ("float32", "bfloat16", "float16")


def _weights(shape, seed, scale=0.02, outliers=True, zero_blocks=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = w.reshape(-1)
    if outliers:  # LLM weights have a few large values; they set their block's absmax
        idx = rng.choice(flat.size, size=max(1, flat.size // 997), replace=False)
        flat[idx] *= rng.uniform(20, 200, size=idx.size)
    if zero_blocks and flat.size >= 128:
        flat[64:128] = 0.0  # one whole block of zeros: absmax 0, codes for 0
    return w


def _ours(w, dtype, block_size, quant_type, double_quant, dq_offset=None):
    return nf4.quantize(
        jnp.asarray(w).astype(dtype), block_size, double_quant, quant_type, dq_offset=dq_offset
    )


def test_code_tables_equal_bitsandbytes():
    assert np.array_equal(bits(nf4.NF4_CODE), bits(bnbF.get_4bit_type("nf4", device="cpu")))
    assert np.array_equal(bits(codebooks.FP4_CODE), bits(bnbF.get_4bit_type("fp4", device="cpu")))
    assert np.array_equal(bits(codebooks.DYNAMIC_CODE), bits(bnbF.create_dynamic_map()))


SHAPES = [(64,), (128, 64), (384, 640), (3, 5, 128), (192, 576), (1536, 576)]
SHAPE_BLOCKS = [(s, b) for s in SHAPES for b in (64, 128) if np.prod(s) % b == 0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, block_size", SHAPE_BLOCKS)
def test_4bit_codes_and_absmax_bitexact(shape, block_size, dtype, quant_type):
    w = _weights(shape, seed=zlib.crc32(repr((shape, dtype)).encode()))
    packed, state = bnb_quantize(w, dtype, block_size, quant_type, double_quant=False)
    q = _ours(w, dtype, block_size, quant_type, double_quant=False)
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert np.array_equal(bits(q.absmax), bits(state.absmax))
    assert np.array_equal(bits(q.dequantize().astype(jnp.float32)), bits(bnb_dequantize(packed, state)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 64), (384, 640), (1536, 576), (1000, 192)])
def test_double_quant_bitexact(shape, dtype, quant_type):
    """Nested codes, nested absmax and dequantized values equal bitsandbytes' given its offset.

    (1000, 192) gives 3000 blocks: the last nested block is short (3000 = 11 * 256 + 184).
    """
    w = _weights(shape, seed=7)
    packed, state = bnb_quantize(w, dtype, 64, quant_type, double_quant=True)
    _, plain_state = bnb_quantize(w, dtype, 64, quant_type, double_quant=False)

    ours_default = _ours(w, dtype, 64, quant_type, double_quant=True)
    offset_ulp = np.spacing(np.float32(state.offset.item()))
    assert abs(float(ours_default.offset) - state.offset.item()) <= 4 * offset_ulp

    q = _ours(w, dtype, 64, quant_type, double_quant=True, dq_offset=state.offset.item())
    ref_codes, ref_nested_absmax = bnb_reference_quantize_blockwise(plain_state.absmax - state.offset)
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.absmax), ref_codes.numpy())
    assert np.array_equal(bits(q.nested_absmax), bits(ref_nested_absmax))
    assert np.array_equal(bits(q.nested_absmax), bits(state.state2.absmax))
    assert np.array_equal(bits(q.offset), bits(state.offset))

    ref_state = bnbF.QuantState.from_dict(
        {
            k: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v)
            for k, v in q.to_bnb().items()
            if k != "weight"
        },
        device="cpu",
    )
    assert np.array_equal(bits(q.dequantize().astype(jnp.float32)), bits(bnb_dequantize(packed, ref_state)))


def test_native_cpu_8bit_kernel_differences_are_its_search_not_ours():
    """bitsandbytes' CPU build quantizes the nested scales with an approximate bucket search
    (csrc BinSearch "Direct2") that misses the nearest code for ~0.1% of values; its reference
    kernel and CUDA kernel pick the nearest code. Ours picks the nearest code: where the native
    CPU codes differ, ours are strictly closer in float64."""
    w = _weights((4096, 512), seed=3)
    packed, state = bnb_quantize(w, "float32", 64, "nf4", double_quant=True)
    q = _ours(w, "float32", 64, "nf4", double_quant=True, dq_offset=state.offset.item())
    _, plain = bnb_quantize(w, "float32", 64, "nf4", double_quant=False)
    x = (plain.absmax - state.offset).numpy().astype(np.float64)
    scale = np.repeat(state.state2.absmax.numpy().astype(np.float64), 256)[: x.size]
    code = codebooks.DYNAMIC_CODE.astype(np.float64)
    ours_err = np.abs(x / scale - code[np.asarray(q.absmax)])
    native_err = np.abs(x / scale - code[state.absmax.numpy()])
    differ = np.asarray(q.absmax) != state.absmax.numpy()
    assert differ.mean() < 0.01
    assert np.all(ours_err[differ] < native_err[differ])
    assert np.all(ours_err <= native_err + 1e-12)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_reads_bitsandbytes_weights_exactly(quant_type, double_quant):
    """A weight quantized by bitsandbytes (native CPU kernels) loads and dequantizes identically."""
    w = _weights((768, 320), seed=11)
    for dtype in DTYPES:
        packed, state = bnb_quantize(w, dtype, 64, quant_type, double_quant)
        q = nf4.NF4Tensor.from_bnb(state.as_dict(), weight=packed.numpy())
        assert q.shape == (768, 320) and q.dtype == dtype
        assert np.array_equal(bits(q.dequantize().astype(jnp.float32)), bits(bnb_dequantize(packed, state)))
        back = q.to_bnb()
        assert np.array_equal(back["weight"], packed.numpy())
        assert np.array_equal(np.asarray(back["absmax"]), state.absmax.numpy())


def test_from_bnb_packed_safetensors_form_of_linear4bit():
    """The serialized form of bnb.nn.Linear4bit (what pre-quantized HF checkpoints hold)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(320, 192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.from_numpy(_weights((192, 320), seed=5)).to(torch.bfloat16),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
    )
    layer = layer.to("cpu")  # quantizes
    state_dict = {k.removeprefix("weight."): v for k, v in layer.state_dict().items()}
    q = nf4.NF4Tensor.from_bnb(state_dict)
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().numpy()
    assert q.shape == (192, 320)
    assert np.array_equal(bits(q.dequantize().astype(jnp.float32)), bits(expected))


def test_to_bnb_layout_matches_quant_state_as_dict():
    w = _weights((256, 128), seed=2)
    packed, state = bnb_quantize(w, "bfloat16", 64, "nf4", double_quant=True)
    ours = _ours(w, "bfloat16", 64, "nf4", True, dq_offset=state.offset.item()).to_bnb()
    theirs = state.as_dict()
    assert set(ours) == set(theirs) | {"weight"}
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].shape == tuple(value.shape) and ours[key].dtype == value.numpy().dtype, key
        else:
            assert ours[key] == value, key
    assert ours["weight"].shape == tuple(packed.shape) and ours["weight"].dtype == np.uint8


# One compiled program per drawn size: eager dispatch would compile each op for each new size
# (~5x slower). tests/quant/test_nf4_jax.py holds eager and jit to the same bits.
QUANTIZE = jax.jit(nf4.quantize, static_argnames=("block_size", "double_quant", "quant_type"))


@settings(max_examples=20, deadline=None)
@given(
    n_blocks=st.integers(1, 600),
    block_size=st.sampled_from([32, 64, 128, 256]),
    log_scale=st.floats(-6, 4),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_bnb_on_random_sizes_and_scales(
    n_blocks, block_size, log_scale, dtype, quant_type, seed
):
    w = _weights((n_blocks * block_size,), seed, scale=10.0**log_scale)
    if dtype == "float16":
        w = np.clip(w, -6e4, 6e4)
    packed, state = bnb_quantize(w, dtype, block_size, quant_type, double_quant=True)
    q = QUANTIZE(jnp.asarray(w).astype(dtype), block_size, True, quant_type, dq_offset=state.offset.item())
    _, plain = bnb_quantize(w, dtype, block_size, quant_type, double_quant=False)
    ref_codes, ref_nested = bnb_reference_quantize_blockwise(plain.absmax - state.offset)
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.absmax), ref_codes.numpy())
    assert np.array_equal(bits(q.nested_absmax), bits(ref_nested))


def test_real_smollm2_weights_bitexact():
    """The embedded SmolLM2-135M's first projections (real weight statistics) match bnb."""
    from qlora_jax.io import gguf as gguf_io

    checked = 0
    for name, weight in gguf_io.iter_tensors(gguf_io.embedded_model_path()):
        if not name.startswith("blk.0.") or weight.ndim != 2:
            continue
        packed, state = bnb_quantize(weight, "bfloat16", 64, "nf4", double_quant=True)
        q = _ours(weight, "bfloat16", 64, "nf4", True, dq_offset=state.offset.item())
        assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1)), name
        assert np.array_equal(bits(q.nested_absmax), bits(state.state2.absmax)), name
        checked += 1
    assert checked == 7


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_ties_round_like_bnb(quant_type):
    """Values exactly on a float32 midpoint between two codes (absmax 1, so the scaled value is
    the midpoint itself) go to the smaller code in bitsandbytes; so do ours."""
    code = np.sort(codebooks.CODES_4BIT[quant_type])
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    above = np.nextafter(mids, np.float32(2))
    below = np.nextafter(mids, np.float32(-2))
    values = np.concatenate([[1.0], mids, above, below, -mids]).astype(np.float32)
    # XLA flushes subnormals to zero; FP4's two zero codes then differ from bnb (both decode to 0)
    values = values[(values == 0) | (np.abs(values) >= np.finfo(np.float32).tiny)]
    w = np.resize(values, 64 * (-(-values.size // 64))).astype(np.float32)
    w[::64] = 1.0  # every block's absmax is exactly 1
    packed, state = bnb_quantize(w, "float32", 64, quant_type, double_quant=False)
    q = _ours(w, "float32", 64, quant_type, double_quant=False)
    assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
