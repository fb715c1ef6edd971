"""Load checkpoints of every supported family (HF directory or GGUF file) into a config and a frozen tree.

Streamed: tensors are read one at a time, linears quantized as they arrive, so host memory holds
the quantized model plus one tensor, never the whole model in 16 bits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from qlora_jax.io import bnb4bit
from qlora_jax.io import gguf as gguf_io
from qlora_jax.models.config import GPT2_FIELDS, LlamaConfig, RopeScaling, from_hf_config
from qlora_jax.models.frozen import Quantization, build_frozen, hf_name, is_conv1d, linear_shapes
from qlora_jax.quant.nf4 import NF4Tensor

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.c_attn": "attn_qkv",  # GPT-2's
    "self_attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")  # llama.cpp's general.architecture values we read


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def load(
    path: str, quant: Quantization, storage_dtype: str, **runtime: Any
) -> tuple[LlamaConfig, dict[str, Any]]:
    """(config, frozen tree of numpy arrays) from a HF directory or a .gguf file."""
    cfg, read = _gguf_source(path, runtime) if is_gguf(path) else _hf_source(_hf_dir(path), runtime)
    return cfg, build_frozen(cfg, read, quant, storage_dtype)


def load_config(path: str, **runtime: Any) -> LlamaConfig:
    """Only the architecture (config.json or GGUF metadata): cheap, so settings are checked before weights."""
    if is_gguf(path):
        return gguf_config(gguf_io.open_reader(path), path, **runtime)
    return _hf_config(_hf_dir(path), runtime)


def _hf_dir(path: str) -> str:
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        raise FileNotFoundError(
            f"model file {path!r} is not a .gguf file; give a HF directory (config.json + *.safetensors)"
        )
    raise FileNotFoundError(f"no model at {path!r}: expected a HF directory with config.json or a .gguf file")


# --- Hugging Face directories -------------------------------------------------------------------


def _hf_json(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: a HF model directory needs config.json next to its *.safetensors"
        )
    with open(config_path) as f:
        return json.load(f)


def _hf_config(path: str, runtime: dict[str, Any]) -> LlamaConfig:
    return from_hf_config(_hf_json(path), **runtime)


def _hf_source(path: str, runtime: dict[str, Any]) -> tuple[LlamaConfig, Callable[[str], Any]]:
    """read(name) of a HF directory: a numpy array, or an NF4Tensor for a weight that a
    bitsandbytes 4-bit checkpoint stores quantized (its bytes as stored)."""
    from qlora_jax.io.safetensors_stream import SafetensorsFile

    hf_json = _hf_json(path)
    cfg = from_hf_config(hf_json, **runtime)
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        listed_in = index_path
    elif os.path.isfile(listed_in := os.path.join(path, "model.safetensors")):
        weight_map = {name: "model.safetensors" for name in SafetensorsFile(listed_in).names()}
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    files: dict[str, SafetensorsFile] = {}

    def read_stored(name: str) -> np.ndarray:
        if name not in weight_map:
            raise KeyError(f"{listed_in}: no tensor {name!r} (the model's config.json needs it)")
        file = weight_map[name]
        if file not in files:
            files[file] = SafetensorsFile(os.path.join(path, file))
        return files[file].read(name)

    bits = bnb4bit.stored_bits(hf_json, os.path.join(path, "config.json"))
    if bits == 8:
        group, linear = next(iter(linear_shapes(cfg)))
        first = hf_name(cfg.model_type, f"model.layers.0.{group}.{linear}.weight")
        raise ValueError(
            f"{os.path.join(path, weight_map.get(first, 'model.safetensors'))}: {first} is an 8-bit "
            "(LLM.int8, load_in_8bit) weight; 8-bit checkpoints are not supported: use a 4-bit "
            "(load_in_4bit) or a 16-bit checkpoint"
        )

    def read(name: str) -> Any:
        if name in weight_map and bnb4bit.is_quantized(name, weight_map):
            return bnb4bit.read_linear(name, weight_map, read_stored, os.path.join(path, weight_map[name]))
        return read_stored(name)

    def stored_name(name: str) -> str:
        """The family's HF name of tree name `name`; without the "transformer." prefix where the file
        holds the base model only (openai-community/gpt2 was saved from GPT2Model)."""
        family_name = hf_name(cfg.model_type, name)
        base_name = family_name.removeprefix("transformer.")
        return base_name if family_name not in weight_map and base_name in weight_map else family_name

    def read_tree_name(name: str) -> Any:
        """The tensor of tree name `name` under its stored name; a Conv1D weight transposed to
        (out, in) unless stored 4-bit (bitsandbytes quantizes Conv1D weights transposed already)."""
        tensor = (read if bits else read_stored)(stored_name(name))
        return tensor.T if is_conv1d(cfg.model_type, name) and not isinstance(tensor, NF4Tensor) else tensor

    return cfg, read_tree_name


# --- GGUF files ---------------------------------------------------------------------------------


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    values = [field.parts[i] for i in field.data]
    if field.types and field.types[0].name == "STRING":
        return bytes(values[0]).decode()
    scalars = [v.item() if v.size == 1 else v.tolist() for v in values]
    return scalars[0] if len(scalars) == 1 else scalars


def gguf_config(reader: Any, path: str, **runtime: Any) -> LlamaConfig:
    """LlamaConfig from a GGUF file's `{architecture}.*` metadata (`path` names the file in errors)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; valid: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise KeyError(f"{path}: GGUF file has no tensor 'token_embd.weight'")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    num_heads = int(meta("attention.head_count"))
    scaling_type = meta("rope.scaling.type", "none")
    scaling = RopeScaling()
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(meta("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise ValueError(f"{path}: GGUF rope scaling {scaling_type!r} is not supported; valid: none, linear")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    head_dim = meta("attention.key_length")
    is_gpt2 = arch == "gpt2"  # llama.cpp's GPT-2: LayerNorm eps, ggml_gelu (tanh approximation)
    eps_key = "attention.layer_norm_epsilon" if is_gpt2 else "attention.layer_norm_rms_epsilon"
    return LlamaConfig(
        vocab_size=int(embed.shape[-1]),
        hidden_size=int(meta("embedding_length")),
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=None if head_dim is None else int(head_dim),
        rms_norm_eps=float(np.float32(meta(eps_key))),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names or (is_gpt2 and _head_copies_embedding(reader)),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        **(dict(GPT2_FIELDS, hidden_act="gelu_new") if is_gpt2 else {}),
        **runtime,
    )


def _head_copies_embedding(reader: Any) -> bool:
    """llama.cpp's GPT-2 converter writes the tied head as output.weight, a byte copy of
    token_embd.weight: such a file is a tied model."""
    tensors = {t.name: t for t in reader.tensors}
    head, embed = tensors["output.weight"], tensors["token_embd.weight"]
    return head.tensor_type == embed.tensor_type and np.array_equal(head.data, embed.data)


def unpermute_qk(w_OxI: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs back to HF's rotate-half)."""
    out_dim = w_OxI.shape[0]
    return (
        w_OxI.reshape(heads, out_dim // heads // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)
    )


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name.startswith("model.norm."):
        return f"output_norm.{name.rsplit('.', 1)[1]}"
    if name == "model.embed_positions.weight":
        return "position_embd.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{param}"


def _gguf_source(path: str, runtime: dict[str, Any]) -> tuple[LlamaConfig, Callable[[str], np.ndarray]]:
    import gguf

    reader = gguf_io.open_reader(path)
    cfg = gguf_config(reader, path, **runtime)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        gguf_name = _gguf_name(name)
        if gguf_name not in tensors:
            raise KeyError(f"{path}: GGUF file has no tensor {gguf_name!r} (for {name})")
        tensor = tensors[gguf_name]
        try:
            values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        except NotImplementedError as err:
            raise ValueError(
                f"{path}: {gguf_name} has GGUF type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from err
        if cfg.model_type != "llama":  # llama.cpp permutes q/k rows of LLaMA only, not of Qwen
            return values
        if name.endswith("q_proj.weight"):
            values = unpermute_qk(values, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_qk(values, cfg.num_kv_heads)
        return values

    return cfg, read


def load_tokenizer(path: str):
    """The transformers tokenizer of a HF directory or a GGUF file (built from its metadata)."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        directory, name = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return AutoTokenizer.from_pretrained(path)
