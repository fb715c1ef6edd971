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
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3: q|k|v rows, as in HF
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: gate|up rows, as in HF
    "self_attn.c_attn": "attn_qkv",  # GPT-2's
    "self_attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
# Gemma's four norms per layer: its post_attention_layernorm norms the attention output
GGUF_SANDWICH_NAMES = GGUF_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# llama.cpp's general.architecture values we read
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2")
# llama.cpp's fixed Gemma hyperparameters, for files without the key: every n-th layer global,
# the layer count of the 27B models (whose attention scale is hidden / heads, not head_dim)
GGUF_GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3": 6}
GGUF_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# transformers' Gemma 3 names of the text decoder inside Gemma3ForConditionalGeneration: as
# saved (4.x and 5.x) and as transformers 5 holds it in memory
LANGUAGE_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")


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
    stored_names = _causal_lm_names(hf_json, weight_map, listed_in)
    weight_map = {name: weight_map[stored] for name, stored in stored_names.items()}
    files: dict[str, SafetensorsFile] = {}

    def read_stored(name: str) -> np.ndarray:
        if name not in weight_map:
            raise KeyError(f"{listed_in}: no tensor {name!r} (the model's config.json needs it)")
        file = weight_map[name]
        if file not in files:
            files[file] = SafetensorsFile(os.path.join(path, file))
        return files[file].read(stored_names[name])

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


def _causal_lm_names(hf_json: dict[str, Any], weight_map: dict[str, str], listed_in: str) -> dict[str, str]:
    """{*ForCausalLM name: stored name}: the names themselves, or for a multimodal Gemma 3
    checkpoint its text decoder's tensors under the names of Gemma3ForCausalLM (the vision
    tower and projector are left out)."""
    if hf_json.get("model_type") != "gemma3":
        return {name: name for name in weight_map}
    prefix = next((p for p in LANGUAGE_MODEL_PREFIXES if f"{p}embed_tokens.weight" in weight_map), None)
    if prefix is None:
        raise KeyError(
            f"{listed_in}: a gemma3 checkpoint without its text decoder (no tensor named "
            f"{' or '.join(p + 'embed_tokens.weight' for p in LANGUAGE_MODEL_PREFIXES)})"
        )
    names = {f"model.{n[len(prefix) :]}": n for n in weight_map if n.startswith(prefix)}
    for head in ("lm_head.weight", "language_model.lm_head.weight"):
        if head in weight_map:
            names["lm_head.weight"] = head
    return names


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
    num_layers = int(meta("block_count"))
    is_gpt2 = arch == "gpt2"  # llama.cpp's GPT-2: LayerNorm eps, ggml_gelu (tanh approximation)
    eps_key = "attention.layer_norm_epsilon" if is_gpt2 else "attention.layer_norm_rms_epsilon"
    if arch.startswith("gemma"):
        family = _gemma_gguf_fields(
            arch, meta, num_layers, int(meta("embedding_length")) // num_heads, head_dim
        )
    elif arch == "phi3":  # fused q|k|v and gate|up; LongRoPE's factors as tensors; 0 means no window
        head_dim = head_dim or int(meta("embedding_length")) // num_heads
        if "rope_factors_long.weight" in names:
            scaling = _gguf_longrope(reader, meta, int(meta("context_length")))
        family = {
            "sliding_window": meta("attention.sliding_window") or None,
            "fused_qkv": True,
            "fused_gate_up": True,
            "partial_rotary_factor": int(meta("rope.dimension_count", head_dim)) / head_dim,
        }
    elif is_gpt2:
        family = dict(GPT2_FIELDS, hidden_act="gelu_new")
    else:
        family = {"qkv_bias": arch == "qwen2", "qk_norm": arch == "qwen3"}
    return LlamaConfig(
        vocab_size=int(embed.shape[-1]),
        hidden_size=int(meta("embedding_length")),
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=None if head_dim is None else int(head_dim),
        rms_norm_eps=float(np.float32(meta(eps_key))),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names or (is_gpt2 and _head_copies_embedding(reader)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        **family,
        **runtime,
    )


def _gguf_longrope(reader: Any, meta: Callable[..., Any], context_length: int) -> RopeScaling:
    """Phi-3's LongRoPE as llama.cpp's converter stores it: the factors as rope_factors_long/short
    tensors, the original length and the attention factor as rope.scaling metadata."""
    tensors = {t.name: t for t in reader.tensors}
    original = int(meta("rope.scaling.original_context_length"))
    return RopeScaling(
        rope_type="longrope",
        factor=context_length / original,
        original_max_position_embeddings=original,
        short_factor=tuple(np.asarray(tensors["rope_factors_short.weight"].data, np.float32).tolist()),
        long_factor=tuple(np.asarray(tensors["rope_factors_long.weight"].data, np.float32).tolist()),
        attention_factor=float(meta("rope.scaling.attn_factor", 1.0)),
    )


def _gemma_gguf_fields(
    arch: str, meta: Callable[..., Any], num_layers: int, hidden_per_head: int, head_dim: int | None
) -> dict[str, Any]:
    """LlamaConfig fields of a llama.cpp gemma2 / gemma3 file, read as llama.cpp reads them: the
    sliding layers from attention.sliding_window_pattern (per layer, or every n-th global; default
    2 / 6), the attention scale from head_dim (hidden / heads for the 27B models), Gemma 2's
    soft-caps (default 50 / 30), Gemma 3's sliding-layer RoPE base (rope.freq_base_swa, default 1e4)."""
    pattern = meta("attention.sliding_window_pattern", GGUF_GEMMA_GLOBAL_EVERY[arch])
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [i % int(pattern) < int(pattern) - 1 for i in range(num_layers)]
    is_gemma2 = arch == "gemma2"
    window = meta("attention.sliding_window", 4096 if is_gemma2 else None)
    return dict(
        hidden_act="gelu_pytorch_tanh",
        sandwich_norms=True,
        unit_offset_norms=True,
        scale_embeddings=True,
        qk_norm=not is_gemma2,
        query_pre_attn_scalar=hidden_per_head if num_layers == GGUF_GEMMA_27B_LAYERS[arch] else head_dim,
        attn_logit_softcapping=float(meta("attn_logit_softcapping", 50.0)) if is_gemma2 else None,
        final_logit_softcapping=float(meta("final_logit_softcapping", 30.0)) if is_gemma2 else None,
        layer_types=tuple("sliding_attention" if s else "full_attention" for s in sliding),
        sliding_window=None if window is None else int(window),
        rope_local_theta=None if is_gemma2 else float(meta("rope.freq_base_swa", 10000.0)),
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


def _gguf_name(name: str, cfg: LlamaConfig) -> str:
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
    gguf_names = GGUF_SANDWICH_NAMES if cfg.sandwich_norms else GGUF_NAMES
    return f"blk.{layer}.{gguf_names[module]}.{param}"


def _gguf_source(path: str, runtime: dict[str, Any]) -> tuple[LlamaConfig, Callable[[str], np.ndarray]]:
    import gguf

    reader = gguf_io.open_reader(path)
    cfg = gguf_config(reader, path, **runtime)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        gguf_name = _gguf_name(name, cfg)
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
        if cfg.unit_offset_norms and name.endswith("norm.weight"):
            return values - np.float32(1.0)  # llama.cpp's Gemma files store (1 + weight)
        if cfg.model_type != "llama":  # llama.cpp permutes q/k rows of LLaMA only, not of Qwen or Gemma
            return values
        if name.endswith("q_proj.weight"):
            values = unpermute_qk(values, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_qk(values, cfg.num_kv_heads)
        return values

    return cfg, read


def load_tokenizer(path: str):
    """The transformers tokenizer of a HF directory or a GGUF file (built from its metadata).

    A GGUF's tokenizer is built as the fast tokenizer class directly: AutoTokenizer would first
    parse the whole file for its model config (10 s for SmolLM2 on 2 CPUs) to pick that same class.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if is_gguf(path):
        directory, name = os.path.split(os.path.abspath(path))
        return PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)
    return AutoTokenizer.from_pretrained(path)
