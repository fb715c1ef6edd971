"""bitsandbytes (CPU) as the reference the NF4 tests compare against."""

import numpy as np
import torch
from bitsandbytes import functional as bnbF

# bitsandbytes registers its pure-PyTorch kernels under this key; native CPU kernels override them.
_REFERENCE_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_quantize(w: np.ndarray, dtype: str, block_size: int, quant_type: str, double_quant: bool):
    """bitsandbytes' own quantize_4bit on a CPU tensor: (packed uint8 codes, QuantState)."""
    tensor = torch.from_numpy(np.asarray(w, np.float32)).to(TORCH_DTYPES[dtype])
    return bnbF.quantize_4bit(
        tensor, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type
    )


def bnb_reference_quantize_blockwise(x: torch.Tensor, block_size: int = 256):
    """bitsandbytes' reference (pure PyTorch) 8-bit blockwise kernel, the one every backend
    without a native kernel runs; the CPU build's native kernel uses an approximate search."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(_REFERENCE_KERNEL, x, bnbF.create_dynamic_map(), block_size)


def bnb_dequantize(packed: torch.Tensor, state) -> np.ndarray:
    """bitsandbytes' dequantize_4bit as float32 numpy in the state's shape; exact for bf16/fp16.

    Where rows hold whole blocks (every real linear layer) this is the native CPU kernel. Where a
    block spans rows, bitsandbytes 0.50's native CPU kernel indexes the scales per row and returns
    wrong values (rows after the first block disagree with its own reference kernel), so there
    we take its reference PyTorch kernel instead.

    FP4 code 8 (sign bit set, magnitude 0) is -0.0 x absmax in bitsandbytes' CUDA kernel and its
    native CPU kernel's scalar loop, but +0.0 in the CPU kernel's AVX512 and NEON tables and in the
    reference kernel. We follow CUDA: those values must be zeros and take its sign; every other
    value is the kernel's own, bit for bit.
    """
    shape = tuple(state.shape)
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    if shape[-1] % state.blocksize == 0:
        out = bnbF.dequantize_4bit(packed, state)
    else:
        op = torch.ops.bitsandbytes.dequantize_4bit.default
        out = op.redispatch(
            _REFERENCE_KERNEL, packed, absmax, state.blocksize, state.quant_type, shape, state.dtype
        )
    out = out.float().numpy().reshape(-1)
    if state.quant_type == "fp4":
        nibbles = packed.numpy().reshape(-1)
        zero = (np.stack([nibbles >> 4, nibbles & 0xF], axis=-1).reshape(-1) == 8)[: out.size]
        assert np.all(out[zero] == 0), "bitsandbytes decoded FP4 code 8 to a nonzero value"
        scale = np.repeat(absmax.float().numpy(), state.blocksize)[: out.size]
        out = np.where(zero, np.float32(-0.0) * scale, out)
    return out.reshape(shape)


def bits(a) -> np.ndarray:
    """View float32 data as uint32 so comparisons are bitwise (distinguish -0.0, NaN payloads)."""
    return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.uint32)
