"""4-bit NormalFloat (and FP4) blockwise quantization with double quantization, as bitsandbytes.

Layout and rounding follow bitsandbytes' reference kernels (`quantize_4bit` /
`quantize_blockwise`): the tensor is flattened row-major, cut into blocks of `block_size`,
each block scaled by the reciprocal of its absmax, and every value rounded to the nearest code
(ties to the smaller code); two codes share a byte, the first in the high nibble. Double
quantization subtracts the mean of the float32 absmax values, then stores them with the 8-bit
dynamic map in blocks of 256. Everything here is pure `jax.numpy`, usable under `jit`, `vmap`
and `lax.scan`; `NF4Tensor` is a pytree whose leaves may carry leading stacked-layer axes.

Where bitsandbytes' own kernels disagree (its CUDA kernel on all-zero blocks and FP4 zeros, its
CPU build's approximate 8-bit search), we quantize as its reference PyTorch kernel does; XLA
flushes subnormal inputs to zero. Dequantizing follows its CUDA kernel, which decodes FP4 code 8
as -0.0 (its CPU kernels disagree on that sign, see tests/quant/bnb_reference.py).
experiments/README.md measures the differences.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.codebooks import CODES_4BIT, DECODE_4BIT, DYNAMIC_CODE, NF4_CODE, rounding_bounds

__all__ = ["NF4_CODE", "NF4Tensor", "dequantize", "quantize", "BLOCK_SIZES"]

# Block sizes bitsandbytes accepts for 4-bit quantization.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # bitsandbytes' block for double quantization of the absmax values
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TINY = np.float32(1e-38)  # bitsandbytes clamps absmax to this before taking its reciprocal


@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """A 4-bit quantized tensor: packed codes and (optionally double-quantized) block scales.

    Leaves (each may have the same leading stack axes, e.g. layers):
      packed         uint8 (..., size // 2): two 4-bit codes per byte, high nibble first.
      absmax         float32 (..., n_blocks), or uint8 codes of the dynamic map when
                     double-quantized.
      nested_absmax  float32 (..., ceil(n_blocks / nested_block_size)), or None.
      offset         float32 (...,), the mean subtracted before double quantization, or None.
    Static metadata: the logical `shape` and `dtype` of one tensor, block sizes, quant type.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    nested_block_size: int | None
    quant_type: str

    @property
    def double_quant(self) -> bool:
        return self.nested_block_size is not None

    @property
    def size(self) -> int:
        """Elements in one logical tensor (not counting stack axes)."""
        return math.prod(self.shape)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes the leaves carry beyond one tensor (e.g. (layers,) when stacked)."""
        return tuple(self.packed.shape[:-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by all leaves (codes and every level of scales)."""
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / (self.size * math.prod(self.stack_shape))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return dequantize(self, dtype)

    def to_bnb(self) -> dict[str, Any]:
        """This tensor as bitsandbytes stores it: `QuantState.as_dict(packed=False)` + `weight`."""
        if self.stack_shape:
            raise ValueError(
                f"to_bnb needs one tensor, got leaves stacked with leading shape {self.stack_shape}"
            )
        state: dict[str, Any] = {
            "weight": np.asarray(self.packed).reshape(-1, 1),
            "quant_type": self.quant_type,
            "absmax": np.asarray(self.absmax),
            "blocksize": self.block_size,
            "quant_map": CODES_4BIT[self.quant_type].copy(),
            "dtype": self.dtype,
            "shape": tuple(self.shape),
        }
        if self.double_quant:
            state.update(
                nested_absmax=np.asarray(self.nested_absmax),
                nested_blocksize=self.nested_block_size,
                nested_quant_map=DYNAMIC_CODE.copy(),
                nested_dtype="float32",
                nested_offset=float(np.asarray(self.offset)),
            )
        return state

    @classmethod
    def from_bnb(
        cls, state: Mapping[str, Any], shape: tuple[int, ...] | None = None, weight: Any = None
    ) -> NF4Tensor:
        """Read a bitsandbytes 4-bit weight without re-quantizing.

        `state` is `QuantState.as_dict()` (optionally with `weight`, the packed codes), or the
        packed form found in pre-quantized HF checkpoints (`absmax`, `quant_map`,
        `nested_*` tensors and the JSON tensor `quant_state.bitsandbytes__nf4`). Tensors may be
        numpy arrays or anything `np.asarray` reads (CPU torch tensors included).
        """
        state = _unpack_bnb_state(state)
        if weight is None:
            if "weight" not in state:
                raise ValueError("from_bnb needs the packed codes: pass weight= or a 'weight' key")
            weight = state["weight"]
        shape = tuple(int(d) for d in (shape if shape is not None else state["shape"]))
        quant_type = str(state["quant_type"])
        _check_quant_type(quant_type)
        _check_code(state["quant_map"], CODES_4BIT[quant_type], "quant_map")
        block_size = int(state["blocksize"])
        size = math.prod(shape)
        packed = np.asarray(weight).view(np.uint8).reshape(-1)
        if packed.size * 2 != size:
            raise ValueError(f"packed weight holds {packed.size * 2} codes, shape {shape} needs {size}")
        nested = "nested_absmax" in state
        if nested:
            _check_code(state["nested_quant_map"], DYNAMIC_CODE, "nested_quant_map")
        dtype = str(state.get("dtype", "float32")).replace("torch.", "")
        return cls(
            packed=jnp.asarray(packed),
            absmax=jnp.asarray(np.asarray(state["absmax"]).reshape(-1)),
            nested_absmax=jnp.asarray(np.asarray(state["nested_absmax"], np.float32).reshape(-1))
            if nested
            else None,
            offset=jnp.asarray(np.float32(np.asarray(state["nested_offset"]))) if nested else None,
            shape=shape,
            dtype=jnp.dtype(dtype).name,
            block_size=block_size,
            nested_block_size=int(state["nested_blocksize"]) if nested else None,
            quant_type=quant_type,
        )


jax.tree_util.register_dataclass(
    NF4Tensor,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "dtype", "block_size", "nested_block_size", "quant_type"],
)


def _unpack_bnb_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Expand the packed (safetensors) QuantState form: its JSON tensor holds the scalars."""
    state = dict(state)
    json_keys = [k for k in state if k.startswith("quant_state.bitsandbytes__")]
    for key in json_keys:
        raw = bytes(np.asarray(state.pop(key)).astype(np.uint8).tobytes())
        state.update(json.loads(raw.decode("utf-8")))
    missing = [k for k in ("quant_type", "absmax", "blocksize", "quant_map") if k not in state]
    if missing:
        raise ValueError(f"bitsandbytes state lacks {missing}; keys present: {sorted(state)}")
    return state


def _check_code(code: Any, expected: np.ndarray, name: str) -> None:
    got = np.asarray(code, dtype=np.float32).reshape(-1)
    if got.shape != expected.shape or not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
        raise ValueError(f"{name} differs from bitsandbytes' standard table; custom maps are not supported")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in CODES_4BIT:
        raise ValueError(f"quant_type {quant_type!r} is not one of {sorted(CODES_4BIT)}")


def _validate(w: jax.Array, block_size: int, quant_type: str) -> None:
    _check_quant_type(quant_type)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not one of {BLOCK_SIZES}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"cannot quantize a tensor of shape {tuple(w.shape)} and dtype {w.dtype}: "
            "only float32, bfloat16 and float16 are supported"
        )
    if w.size == 0 or w.size % block_size:
        raise ValueError(
            f"cannot quantize a tensor of shape {tuple(w.shape)} ({w.size} elements): "
            f"its size must be a positive multiple of block_size={block_size}"
        )
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.isfinite(w).all()):
        raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)}: it contains NaN or inf values")


def _block_scale(x_NxB: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-block absmax and the reciprocal bitsandbytes multiplies by (0 for all-zero blocks)."""
    absmax_N = jnp.max(jnp.abs(x_NxB), axis=-1)
    safe_N = jnp.maximum(absmax_N, _TINY)
    recip_N = jnp.where(absmax_N > 0, 1.0 / safe_N, 0.0).astype(jnp.float32)
    return absmax_N, recip_N


def _round_to_code(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest code (ties to the smaller). 15 bounds compare in one fused pass;
    the 255 of the 8-bit map take a binary search (comparing against all compiles slowly)."""
    bounds, order = rounding_bounds(code)
    method = "compare_all" if bounds.size < 32 else "scan"
    idx = jnp.searchsorted(jnp.asarray(bounds), scaled, side="left", method=method)
    return jnp.asarray(order)[idx]


def quantize_blockwise_4bit(w: jax.Array, block_size: int, quant_type: str) -> tuple[jax.Array, jax.Array]:
    """Flattened `w` -> (packed uint8 (size // 2,), float32 absmax (size // block_size,))."""
    x_NxB = w.astype(jnp.float32).reshape(-1, block_size)
    absmax_N, recip_N = _block_scale(x_NxB)
    scaled = jnp.clip(x_NxB * recip_N[:, None], -1.0, 1.0).reshape(-1, 2)
    codes = _round_to_code(scaled, CODES_4BIT[quant_type])
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return packed.astype(jnp.uint8), absmax_N


def quantize_blockwise_8bit(x: jax.Array, block_size: int = NESTED_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
    """1-D float32 `x` -> (uint8 dynamic-map codes, float32 absmax per block).

    A short last block is allowed and, as in bitsandbytes' reference kernel, divided by its
    absmax rather than multiplied by the reciprocal."""
    n = x.shape[0]
    n_blocks = -(-n // block_size)
    x_NxB = jnp.pad(x, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
    absmax_N, recip_N = _block_scale(x_NxB)
    scaled = x_NxB * recip_N[:, None]
    if n % block_size:
        last = n_blocks - 1
        # bitsandbytes clamps (and stores) a short last block's absmax at 1e-38. A float select
        # is not enough: XLA rewrites select(a > 0, a, tiny) to max(a, tiny), which a flush-to-zero
        # backend computes as 0 (seen under jit on CPU for a one-block tensor). Select the bits.
        absmax_last = _select_bits(absmax_N[last] > 0, absmax_N[last], _TINY)
        absmax_N = absmax_N.at[last].set(absmax_last)
        divided = jnp.where(x_NxB[last] != 0, x_NxB[last] / absmax_last, 0.0)
        scaled = scaled.at[last].set(divided)
    codes = _round_to_code(jnp.clip(scaled, -1.0, 1.0), DYNAMIC_CODE)
    return codes.reshape(-1)[:n].astype(jnp.uint8), absmax_N


def _select_bits(pred: jax.Array, a: jax.Array, b: np.float32) -> jax.Array:
    """where(pred, a, b) on float32 bit patterns, so no float op can flush a subnormal b."""
    a_bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    return jax.lax.bitcast_convert_type(jnp.where(pred, a_bits, np.float32(b).view(np.uint32)), jnp.float32)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s + e == a + b exactly, s = fl(a + b) (Knuth; float32, no reassociation under XLA)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def fixed_order_mean(x: jax.Array) -> jax.Array:
    """Mean of 1-D float32 `x`, the same bits however XLA compiles it, within about 1 ulp.

    A reduce op leaves its summation order to the compiler: on an H100, `jnp.mean` of the same
    absmax values changed with the autotuning level, and so did every scale code and the base's
    fingerprint (experiments/results/fingerprint_probe.json). Here the sum is a fixed pairwise
    tree of elementwise adds (commutative, so one result), each carrying its rounding error
    (two-sum), times the float32 reciprocal of n: XLA turns a division by a constant into that
    multiplication under jit only, so spelling it out makes eager, jit and vmap agree."""
    n = x.shape[0]
    hi = jnp.pad(x.astype(jnp.float32), (0, (1 << max(n - 1, 0).bit_length()) - n))
    lo = jnp.zeros_like(hi)
    while hi.shape[0] > 1:
        hi, err = _two_sum(hi[0::2], hi[1::2])
        lo = lo[0::2] + lo[1::2] + err
    return (hi[0] + lo[0]) * np.float32(1.0 / n)


def quantize(
    w: jax.Array,
    block_size: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    dq_offset: jax.Array | float | None = None,
) -> NF4Tensor:
    """Quantize `w` (float32/bf16/fp16, size divisible by `block_size`) to 4 bits per value.

    `dq_offset` overrides the mean subtracted from the absmax values before double quantization
    (by default `fixed_order_mean`, the same bits on every backend and in every process).
    bitsandbytes takes it from `torch.mean`, whose float32 rounding depends on torch's reduction
    order; pass its `nested_offset` to reproduce a bitsandbytes quantization byte for byte.
    """
    w = jnp.asarray(w)
    _validate(w, block_size, quant_type)
    packed, absmax = quantize_blockwise_4bit(w, block_size, quant_type)
    nested_absmax = offset = None
    if double_quant:
        offset = fixed_order_mean(absmax) if dq_offset is None else jnp.asarray(dq_offset, jnp.float32)
        absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCK_SIZE)
    return NF4Tensor(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype).name,
        block_size=block_size,
        nested_block_size=NESTED_BLOCK_SIZE if double_quant else None,
        quant_type=quant_type,
    )


def block_absmax(q: NF4Tensor) -> jax.Array:
    """float32 scale of every 4-bit block, (..., n_blocks); undoes double quantization."""
    if not q.double_quant:
        return q.absmax
    n_blocks = q.absmax.shape[-1]
    n_nested = q.nested_absmax.shape[-1]
    pad = [(0, 0)] * (q.absmax.ndim - 1) + [(0, n_nested * q.nested_block_size - n_blocks)]
    padded = jnp.pad(q.absmax, pad)
    codes = jnp.asarray(DYNAMIC_CODE)[padded.reshape(*q.stack_shape, n_nested, q.nested_block_size)]
    scaled = (codes * q.nested_absmax[..., None]).reshape(*q.stack_shape, -1)[..., :n_blocks]
    return scaled + jnp.asarray(q.offset)[..., None]


def decode_blocks(
    packed: jax.Array, absmax: jax.Array, quant_type: str, block_size: int, dtype: Any
) -> jax.Array:
    """Whole 4-bit blocks back to values: codes (..., n * block_size // 2) and float32 scales
    (..., n) -> (..., n * block_size) in `dtype`."""
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    values = jnp.asarray(DECODE_4BIT[quant_type])[codes.astype(jnp.int32)]  # FP4 code 8: -0.0
    out = values.reshape(*absmax.shape, block_size) * absmax[..., None]
    return out.astype(dtype).reshape(*absmax.shape[:-1], -1)


def dequantize(q: NF4Tensor, dtype: Any = None) -> jax.Array:
    """Rebuild the tensor (with any stack axes) in `dtype` (default: the quantized input's)."""
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    out = decode_blocks(q.packed, block_absmax(q), q.quant_type, q.block_size, dtype)
    return out.reshape(*q.stack_shape, *q.shape)


def can_slice(q: NF4Tensor, axis: int, pieces: int) -> bool:
    """Whether a 2-D tensor splits into `pieces` equal slices along `axis` of whole blocks."""
    if len(q.shape) != 2 or q.stack_shape or q.shape[1] % q.block_size:
        return False
    return q.shape[axis] % (pieces * (q.block_size if axis == 1 else 1)) == 0


def dequantize_slice(
    q: NF4Tensor, axis: int, start: jax.Array | int, count: int, dtype: Any = None
) -> jax.Array:
    """Rows (axis 0) or columns (axis 1) [start, start + count) of a 2-D tensor, decoding only
    those blocks (`can_slice` must hold; `start` may be traced, a multiple of the block size for
    columns). Memory: one slice in `dtype`, not the whole tensor."""
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    rows, cols = q.shape
    packed = q.packed.reshape(rows, cols // 2)
    absmax = block_absmax(q).reshape(rows, cols // q.block_size)
    if axis == 0:
        packed = jax.lax.dynamic_slice_in_dim(packed, start, count, axis=0)
        absmax = jax.lax.dynamic_slice_in_dim(absmax, start, count, axis=0)
    else:
        packed = jax.lax.dynamic_slice_in_dim(packed, start // 2, count // 2, axis=1)
        absmax = jax.lax.dynamic_slice_in_dim(absmax, start // q.block_size, count // q.block_size, axis=1)
    return decode_blocks(packed, absmax, q.quant_type, q.block_size, dtype)
