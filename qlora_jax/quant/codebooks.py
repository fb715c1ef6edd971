"""The lookup tables of bitsandbytes' 4-bit and 8-bit blockwise formats, rebuilt bit for bit.

NF4 and FP4 are the 16-entry tables of `bitsandbytes.functional.get_4bit_type`; the 8-bit
"dynamic" map (used for double quantization of the 4-bit scales) is rebuilt the way
`create_dynamic_map` builds it, including torch's float32 `linspace` rounding, so the values
equal bitsandbytes' to the bit without importing torch.
"""

import numpy as np

_F32 = np.float32

# Quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, appendix E), in bitsandbytes' code order.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=_F32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by its absmax (12) in
# float32 as bitsandbytes does. Its "negative zero" (code 8) is +0.0: bitsandbytes writes the
# integer -0 (its CUDA kernel decodes it as -0.0 all the same, see FP4_DECODE).
FP4_CODE = np.array(
    [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=_F32,
) / _F32(12.0)

CODES_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}

# The values `dequantize` multiplies by: bitsandbytes' CUDA kernel decodes FP4 from its sign bit, so
# code 8 gives -0.0 where the table holds +0.0. quant_map and rounding keep the tables above.
FP4_DECODE = FP4_CODE.copy()
FP4_DECODE[8] = -0.0
DECODE_4BIT = {"nf4": NF4_CODE, "fp4": FP4_DECODE}


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace` on CPU: fused multiply-add from both ends toward the middle."""
    start32, end32 = _F32(start), _F32(end)
    step = _F32((end32 - start32) / _F32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + np.float64(step) * idx
    from_end = np.float64(end32) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, from_start, from_end).astype(_F32)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted float32 values in [-1, 1])."""
    non_sign_bits = total_bits - 1
    values: list[np.ndarray] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = _torch_linspace_f32(0.1, 1.0, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / _F32(2.0)
        scale = _F32(10.0 ** (-(max_exponent_bits - 1) + i))
        values += [scale * means, -scale * means]
    values.append(np.array([0.0, 1.0], dtype=_F32))
    table = np.sort(np.concatenate(values)).astype(_F32)
    if table.size != 2**total_bits:
        raise ValueError(f"dynamic map has {table.size} values, expected {2**total_bits}")
    return table


DYNAMIC_CODE = dynamic_map()


def rounding_bounds(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between sorted code values and the sort order, as bitsandbytes rounds to a code.

    A value x gets code `order[searchsorted(bounds, x, side="left")]`: the nearest code, a tie
    going to the smaller value (torch.bucketize semantics). The sort is stable, as torch's is for
    16 values, which decides FP4's +0/-0 pair.
    """
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    bounds = (ordered[:-1] + ordered[1:]) / _F32(2.0)
    return bounds.astype(_F32), order.astype(np.uint8)
