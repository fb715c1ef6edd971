"""Bit-exactness of qlora_jax's NF4/FP4 (+ double quantization) against bitsandbytes' CUDA kernels.

The CPU tests compare with bitsandbytes' CPU build; this runs on the GPU, where QLoRA users
quantize, and counts differing bytes/values for Llama-2-7B linear shapes and edge cases.
Needs torch with CUDA and bitsandbytes. Writes one JSON file.

  python experiments/bnb_cuda_parity.py --out experiments/results/bnb_cuda_parity.json
"""

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bitsandbytes import functional as bnbF

from qlora_jax.quant import nf4

CASES = [
    ("q_proj", (4096, 4096), "normal"),
    ("gate_proj", (11008, 4096), "normal"),
    ("down_proj", (4096, 11008), "normal+outliers"),
    ("odd_nested_tail", (1000, 192), "normal+zero_blocks"),
    ("all_zero", (64, 256), "zeros"),
]


def _weights(shape, kind, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    flat = w.reshape(-1)
    if "outliers" in kind:
        idx = rng.choice(flat.size, size=flat.size // 997, replace=False)
        flat[idx] *= rng.uniform(20, 200, size=idx.size)
    if "zero_blocks" in kind:
        flat[64:640] = 0.0
    if kind == "zeros":
        w[:] = 0.0
    return w


def _bits(a):
    return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.uint32)


def compare(w, quant_type, dtype):
    t_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    packed, state = bnbF.quantize_4bit(
        torch.from_numpy(w).to(t_dtype).cuda(),
        blocksize=64,
        compress_statistics=True,
        quant_type=quant_type,
    )
    bnb_offset = state.offset.item()
    wj = jnp.asarray(w).astype(dtype)
    ours_default = nf4.quantize(wj, quant_type=quant_type)
    ours = nf4.quantize(wj, quant_type=quant_type, dq_offset=bnb_offset)
    bnb_dq = bnbF.dequantize_4bit(packed, state).float().cpu().numpy().reshape(w.shape)
    ours_dq = np.asarray(ours.dequantize().astype(jnp.float32))
    loaded = nf4.NF4Tensor.from_bnb(
        {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in state.as_dict().items()},
        weight=packed.cpu().numpy(),
    )
    ulp = float(np.spacing(np.float32(bnb_offset))) or 1.0
    offset_ulps = abs(float(ours_default.offset) - bnb_offset) / ulp
    return {
        "packed_bytes_differing": int((np.asarray(ours.packed) != packed.cpu().numpy().reshape(-1)).sum()),
        "packed_bytes": int(ours.packed.size),
        "nested_codes_differing": int((np.asarray(ours.absmax) != state.absmax.cpu().numpy()).sum()),
        "nested_codes": int(ours.absmax.size),
        "nested_absmax_differing": int((_bits(ours.nested_absmax) != _bits(state.state2.absmax.cpu())).sum()),
        "offset_bitexact_given_bnb_offset": bool(_bits(ours.offset) == _bits(state.offset.cpu())),
        "default_offset_ulps_from_bnb": offset_ulps,
        "dequantized_values_differing": int((_bits(ours_dq) != _bits(bnb_dq)).sum()),
        "from_bnb_dequantized_values_differing": int(
            (_bits(np.asarray(loaded.dequantize().astype(jnp.float32))) != _bits(bnb_dq)).sum()
        ),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for seed, (name, shape, kind) in enumerate(CASES):
        w = _weights(shape, kind, seed)
        for quant_type in ("nf4", "fp4"):
            for dtype in ("bfloat16", "float32"):
                row = {
                    "case": name,
                    "shape": list(shape),
                    "quant_type": quant_type,
                    "dtype": dtype,
                    **compare(w, quant_type, dtype),
                }
                rows.append(row)
                print(json.dumps(row))
    import bitsandbytes

    result = {
        "experiment": "bnb_cuda_parity",
        "gpu": torch.cuda.get_device_name(),
        "jax_device": jax.devices()[0].device_kind,
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "cases": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
