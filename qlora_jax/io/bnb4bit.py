"""The bitsandbytes 4-bit Hugging Face checkpoint format (the `*-bnb-4bit` repositories), both ways.

transformers + bitsandbytes save each 4-bit linear as its packed codes under the weight's own
name plus companion tensors: `.absmax`, `.quant_map`, with double quantization `.nested_absmax` and
`.nested_quant_map`, and `.quant_state.bitsandbytes__<nf4|fp4>`, a uint8 tensor holding the JSON
of the scalars (quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype,
nested_offset). Our NF4Tensor holds the same bytes, so reading and writing copy them unchanged.
Modules the checkpoint keeps in 16 bits (`llm_int8_skip_modules`, the lm_head by default) are plain
tensors under their name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qlora_jax.quant import nf4

COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # the last two: double quant


def stored_bits(hf_config: Mapping[str, Any], config_path: str) -> int | None:
    """4 or 8 for a bitsandbytes checkpoint (its quantization_config), None for a 16-bit one;
    other quantization methods stop with one line."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(
            f"{config_path}: quantization_config.quant_method {method!r} is not supported; valid: "
            "'bitsandbytes' with load_in_4bit (or an unquantized checkpoint)"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return 8
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{config_path}: quantization_config has neither load_in_4bit nor load_in_8bit")
    return 4


def state_key(name: str, names: Any) -> str | None:
    """The `.quant_state.bitsandbytes__*` entry of weight `name` among `names`, if any."""
    for quant_type in sorted(nf4.CODES_4BIT):
        key = f"{name}.quant_state.bitsandbytes__{quant_type}"
        if key in names:
            return key
    return None


def is_quantized(name: str, names: Any) -> bool:
    """Whether weight `name` is stored 4-bit (it has companions), not kept in 16 bits."""
    return state_key(name, names) is not None or f"{name}.absmax" in names


def read_linear(name: str, names: Any, read: Callable[[str], np.ndarray], where: str) -> nf4.NF4Tensor:
    """The 4-bit weight `name` as an NF4Tensor, its bytes as stored (`where` names the file)."""
    key = state_key(name, names)
    if key is None:
        raise ValueError(
            f"{where}: {name} has 4-bit companions but no quant_state.bitsandbytes__nf4 (or __fp4) entry; "
            "the checkpoint is incomplete"
        )
    encoded = read(key)
    scalars = json.loads(bytes(np.asarray(encoded, np.uint8)).decode())
    if scalars.get("blocksize") not in nf4.BLOCK_SIZES:
        raise ValueError(
            f"{where}: {name} has blocksize {scalars.get('blocksize')}; supported: {nf4.BLOCK_SIZES}"
        )
    state = {key.removeprefix(f"{name}."): encoded}
    for companion in COMPANIONS if "nested_offset" in scalars else COMPANIONS[:2]:
        if f"{name}.{companion}" not in names:
            raise ValueError(
                f"{where}: {name} has no {name}.{companion} tensor; the checkpoint is incomplete"
            )
        state[companion] = read(f"{name}.{companion}")
    try:
        return nf4.NF4Tensor.from_bnb(state, weight=read(name))
    except ValueError as err:
        raise ValueError(f"{where}: {name}: {err}") from err


def linear_tensors(name: str, weight: nf4.NF4Tensor) -> dict[str, np.ndarray]:
    """The tensors bitsandbytes saves for one 4-bit weight (its `QuantState.as_dict(packed=True)`
    plus the packed codes), byte for byte."""
    state = weight.to_bnb()
    tensors = {name: state.pop("weight"), f"{name}.absmax": state.pop("absmax")}
    tensors[f"{name}.quant_map"] = np.asarray(state.pop("quant_map"), np.float32)
    if weight.double_quant:
        tensors[f"{name}.nested_absmax"] = np.asarray(state.pop("nested_absmax"), np.float32)
        tensors[f"{name}.nested_quant_map"] = np.asarray(state.pop("nested_quant_map"), np.float32)
    scalars = {key: state[key] for key in ("quant_type", "blocksize", "dtype")}
    scalars["shape"] = list(state["shape"])
    for key in ("nested_blocksize", "nested_dtype", "nested_offset"):
        if key in state:
            scalars[key] = state[key]
    encoded = np.frombuffer(json.dumps(scalars).encode(), np.uint8).copy()
    tensors[f"{name}.quant_state.bitsandbytes__{weight.quant_type}"] = encoded
    return tensors


def config_entry(quant: Any, compute_dtype: str, skip_modules: list[str] | None) -> dict[str, Any]:
    """The quantization_config transformers writes for a bitsandbytes 4-bit model (skip_modules
    None: its default, the output head kept in 16 bits)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant.quant_type,
        "bnb_4bit_use_double_quant": quant.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
