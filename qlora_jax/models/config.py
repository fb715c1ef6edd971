"""LlamaConfig: the architecture of a LLaMA-style decoder and how to run it, read from HF or GGUF.

One config covers every supported family (MODEL_TYPES): a family is a set of field values
(Qwen2: qkv_bias, Qwen3: qk_norm, Mistral: sliding_window, Phi-3: fused_qkv + fused_gate_up, Gemma 2/3:
sandwich_norms and the fields beside it, GPT-2: GPT2_FIELDS), which the decoder reads; nothing branches
on the family's name except the HF config reader and writer here and the HF tensor names
(models/frozen.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
# transformers' model_type values we load; "gemma3" is Gemma 3's multimodal checkpoint, of which
# the text decoder loads (as gemma3_text)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3", "gpt2")
NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_EMBEDDINGS = ("rope", "learned")
# The MLP's activation, by transformers' name (decoder.ACTIVATIONS computes each): SwiGLU's silu,
# Gemma's GeGLU gelu_pytorch_tanh, GPT-2's gelu_new (both GELU's tanh approximation) or exact gelu.
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")
GEMMA_ACTS = ("silu", "gelu_pytorch_tanh")  # what Gemma's config.json may name (hidden_activation)
GPT2_ACTS = ("gelu_new", "gelu")  # what GPT-2's config.json may name (activation_function)
# GPT-2's architecture: LayerNorm with bias, a learned position table, a non-gated GELU MLP and one
# fused q|k|v projection, biases on every projection (its hidden_act comes from its config).
GPT2_FIELDS = dict(
    norm_type="layernorm",
    position_embedding="learned",
    gated_mlp=False,
    fused_qkv=True,
    attention_bias=True,
    mlp_bias=True,
)
# A family's own field and the fields no HF class of that family has (Qwen2, Qwen3, Phi-3, Gemma 2/3;
# GPT-2's set is checked as a whole, _check_gpt2_fields); "sliding_window" here is one window on
# every layer (Mistral's, Phi-3's), not Gemma's per-layer windows.
FAMILY_CLASHES = {
    "qkv_bias": ("qk_norm", "attention_bias", "mlp_bias", "sliding_window"),
    "qk_norm": ("mlp_bias", "sliding_window", "attn_logit_softcapping"),
    "fused_gate_up": ("qkv_bias", "qk_norm", "attention_bias", "mlp_bias", "sandwich_norms"),
    "sandwich_norms": ("qkv_bias", "mlp_bias", "sliding_window"),
}
PHI3_ORIGINAL_MAX_POSITIONS = 4096  # transformers' Phi3Config default of original_max_position_embeddings
# Fields only Gemma 2/3 have: set without sandwich_norms they describe no supported family.
GEMMA_FIELDS = (
    "unit_offset_norms",
    "scale_embeddings",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "layer_types",
    "rope_local_theta",
)
LAYER_TYPES = ("sliding_attention", "full_attention")
QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default when config.json has no head_dim
REMAT_POLICIES = (
    "auto",  # offload; offload_attention from 16,384 tokens per row where the host holds it
    "none",  # keep every activation (no rematerialization)
    "full",  # save only the layer inputs, recompute the rest in backward
    "offload",  # as full, with the saved layer inputs in pinned host memory (copies scheduled by XLA)
    "offload_attention",  # as offload, plus attention's output and statistics: no attention recompute
    "offload_all",  # every matmul operand on the host: backward recomputes no forward at all
    "dots_saveable",  # keep matmul outputs, recompute elementwise work
    "dots_with_no_batch_dims_saveable",  # keep weight matmul outputs, recompute attention
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding frequencies: HF's `rope_scaling` / `rope_parameters` (rope_type != default)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3, longrope
    short_factor: tuple[float, ...] = ()  # longrope: frequency divisors while positions fit the original
    long_factor: tuple[float, ...] = ()  # longrope: divisors once a position reaches past the original
    attention_factor: float = 1.0  # longrope: cos and sin multiplied by this (attention sharpened)

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; valid: {ROPE_TYPES}")
        object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
        if self.rope_type == "longrope" and not (
            self.original_max_position_embeddings and self.short_factor and self.long_factor
        ):
            raise ValueError(
                "rope_type 'longrope' needs original_max_position_embeddings, short_factor and long_factor"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of the decoder plus runtime choices (dtype, scan, remat, attention kernel)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-5  # every norm's epsilon (GPT-2: layer_norm_epsilon)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o (HF Llama, Qwen3)
    mlp_bias: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only, none on o
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's features of q and k, before RoPE
    # attend to the last `sliding_window` keys only: on every layer (Mistral, Phi-3) or layer_types'
    # sliding ones (Gemma)
    sliding_window: int | None = None
    # one projection whose output features are q, then k, then v (sizes from the head counts):
    # Phi-3's qkv_proj, GPT-2's c_attn
    fused_qkv: bool = False
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj whose output features are gate, then up
    partial_rotary_factor: float = 1.0  # Phi-3/4: RoPE turns the first int(head_dim * factor) features
    hidden_act: str = "silu"  # the MLP's activation (HIDDEN_ACTS)
    # Gemma 2/3: post_attention_layernorm and post_feedforward_layernorm norm each sublayer's output
    # before the residual add, pre_feedforward_layernorm the MLP's input (four norms per layer)
    sandwich_norms: bool = False
    unit_offset_norms: bool = False  # Gemma: RMSNorm scales by (1 + weight), in float32 before the cast
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to their dtype
    query_pre_attn_scalar: int | None = None  # Gemma: scores scaled by this ** -0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    # Gemma: per layer "sliding_attention" (sliding_window applies) or "full_attention";
    # None: sliding_window, if set, applies to every layer (Mistral, Phi-3)
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of sliding layers (no scaling)
    # the text decoder of a multimodal checkpoint (Gemma 3's gemma3): the same model, whose modules
    # peft names model.language_model.* (Gemma3ForConditionalGeneration) in adapters
    text_of_multimodal: bool = False
    norm_type: str = "rmsnorm"  # "layernorm": LayerNorm with a bias (GPT-2)
    position_embedding: str = "rope"  # "learned": a table of max_position_embeddings rows (GPT-2)
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-2's c_fc, c_proj)
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # How to run it (not part of the checkpoint).
    dtype: str = "bfloat16"  # compute dtype of matmuls and the residual stream
    scan_layers: bool = True  # False: the layers one after another, no loop (longer compile)
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: cuDNN flash attention on GPU when it applies, else XLA
    seq_tile: int = 0  # > 0: run the MLP over tiles of this many tokens (long context); 0: whole
    dequant_slices: int = 1  # > 1: NF4 weights dequantized this many slices at a time (less memory)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} unknown; valid: {REMAT_POLICIES}")
        if self.seq_tile < 0:
            raise ValueError(f"seq_tile {self.seq_tile} must be >= 0 (0: no tiling)")
        if self.dequant_slices < 1:
            raise ValueError(f"dequant_slices {self.dequant_slices} must be >= 1 (1: whole weights)")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl {self.attention_impl!r} unknown; valid: None, 'xla', 'cudnn'")
        for field, value, valid in (
            ("norm_type", self.norm_type, NORM_TYPES),
            ("position_embedding", self.position_embedding, POSITION_EMBEDDINGS),
            ("hidden_act", self.hidden_act, HIDDEN_ACTS),
        ):
            if value not in valid:
                raise ValueError(f"{field} {value!r} is not supported; valid: {valid}")
        self._check_gpt2_fields()
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and turn an even "
                f"number of a head's {self.head_dim} features (it turns {self.rotary_dim})"
            )
        factors = {len(self.rope_scaling.short_factor), len(self.rope_scaling.long_factor)}
        if self.rope_scaling.rope_type == "longrope" and factors != {self.rotary_dim // 2}:
            raise ValueError(
                f"longrope short_factor/long_factor have {sorted(factors)} values; the rotary dimension "
                f"{self.rotary_dim} needs {self.rotary_dim // 2} each"
            )
        if (self.fused_gate_up or self.partial_rotary_factor != 1.0) and not (
            self.fused_qkv and self.fused_gate_up
        ):
            raise ValueError(
                "fused_gate_up and partial_rotary_factor != 1 are Phi-3's and need fused_qkv=True and "
                f"fused_gate_up=True; no other supported family {MODEL_TYPES} has them"
            )
        if self.fused_qkv and not (self.fused_gate_up or self.position_embedding == "learned"):
            raise ValueError(
                "fused_qkv is Phi-3's (with fused_gate_up=True) or GPT-2's (with its GPT2_FIELDS); "
                "alone it matches no supported family"
            )
        if self.attention_impl == "cudnn" and self.attn_logit_softcapping is not None:
            raise ValueError(
                "attention_impl 'cudnn' has no score soft-capping (attn_logit_softcapping); use 'xla'"
            )
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            self._check_layer_types()
        fields_on = {
            "fused_gate_up": self.fused_gate_up,
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.uniform_window is not None,
            "attn_logit_softcapping": self.attn_logit_softcapping is not None,
            "sandwich_norms": self.sandwich_norms,
        }
        for field, clashing in FAMILY_CLASHES.items():
            clash = [name for name in clashing if fields_on[name]]
            if fields_on[field] and clash:
                raise ValueError(f"{field} with {', '.join(clash)} matches no supported family {MODEL_TYPES}")
        gemma_on = [name for name in GEMMA_FIELDS if getattr(self, name) not in (None, False)]
        if gemma_on and not self.sandwich_norms:
            raise ValueError(f"{', '.join(gemma_on)} without sandwich_norms matches no supported family")
        if self.sandwich_norms and not (self.unit_offset_norms and self.scale_embeddings):
            raise ValueError(
                "sandwich_norms needs unit_offset_norms and scale_embeddings (Gemma 2/3 have all three)"
            )
        if self.rope_local_theta is not None and not self.qk_norm:
            raise ValueError("rope_local_theta (Gemma 3) without qk_norm matches no supported family")
        if self.text_of_multimodal and self.model_type != "gemma3_text":
            raise ValueError("text_of_multimodal is Gemma 3's (model_type gemma3) only")
        family_acts = self._family_acts()
        if self.hidden_act not in family_acts:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} of model_type {self.model_type!r} is not supported; "
                f"valid: {family_acts}"
            )

    def _family_acts(self) -> tuple[str, ...]:
        """The activations the family of these fields has (its HF config names one of them)."""
        if self.position_embedding == "learned":
            return GPT2_ACTS
        return GEMMA_ACTS if self.sandwich_norms else ("silu",)

    def _check_layer_types(self) -> None:
        kinds = self.layer_types
        if len(kinds) != self.num_layers or not set(kinds) <= set(LAYER_TYPES):
            raise ValueError(
                f"layer_types {list(kinds)} must give each of {self.num_layers} layers one of {LAYER_TYPES}"
            )
        if "sliding_attention" in kinds and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is None")

    @property
    def uniform_window(self) -> int | None:
        """The sliding window of every layer (Mistral, Phi-3), or None (none, or per layer: layer_types)."""
        return self.sliding_window if self.layer_types is None else None

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE turns (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def _check_gpt2_fields(self) -> None:
        """GPT-2's fields come as a set (no other supported family has any of them)."""
        gpt2_on = (self.norm_type == "layernorm", self.position_embedding == "learned", not self.gated_mlp)
        if not any(gpt2_on):
            return
        wrong = [f"{k}={getattr(self, k)!r}" for k, v in GPT2_FIELDS.items() if getattr(self, k) != v]
        others = ("qkv_bias", "qk_norm", "fused_gate_up", "sandwich_norms")  # Qwen's, Phi-3's, Gemma's
        wrong += [f"{k}=True" for k in others if getattr(self, k)]
        if self.partial_rotary_factor != 1.0 or self.rope_scaling.rope_type != "default":
            wrong.append(
                f"partial_rotary_factor={self.partial_rotary_factor}, rope_scaling={self.rope_scaling}"
            )
        if self.sliding_window is not None:
            wrong.append(f"sliding_window={self.sliding_window}")
        if self.num_kv_heads != self.num_heads or self.head_dim * self.num_heads != self.hidden_size:
            wrong.append(f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}")
        if wrong:
            raise ValueError(
                f"GPT-2's fields {GPT2_FIELDS} (num_kv_heads = num_heads, head_dim = hidden / heads) come "
                f"together and without other families' fields; got {', '.join(wrong)}"
            )

    @property
    def model_type(self) -> str:
        """The transformers family whose architecture these fields describe (for export)."""
        if self.position_embedding == "learned":
            return "gpt2"
        if self.fused_gate_up:
            return "phi3"
        if self.sandwich_norms:
            return "gemma3_text" if self.qk_norm else "gemma2"
        if self.qk_norm:
            return "qwen3"
        if self.qkv_bias:
            return "qwen2"
        return "llama" if self.sliding_window is None else "mistral"

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameters of the base model (embeddings, linears, norms, untied head)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        mlp_linears = 3 if self.gated_mlp else 2
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        qkv_bias = h * (self.num_heads + 2 * self.num_kv_heads)
        bias = (qkv_bias + d) if self.attention_bias else qkv_bias if self.qkv_bias else 0
        bias += ((mlp_linears - 1) * f + d) if self.mlp_bias else 0
        qk_norms = 2 * h if self.qk_norm else 0
        norm = 2 * d if self.norm_type == "layernorm" else d  # weight (and bias) of one norm
        norms = (4 if self.sandwich_norms else 2) * norm
        layer = attn + mlp_linears * d * f + norms + bias + qk_norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        positions = self.max_position_embeddings * d if self.position_embedding == "learned" else 0
        return self.vocab_size * d + positions + self.num_layers * layer + norm + head


def _longrope_from_hf(hf: Mapping[str, Any], scaling: Mapping[str, Any], original: int | None) -> RopeScaling:
    """LongRoPE as transformers initializes it: factor defaults to max_position_embeddings /
    original, and the attention factor to sqrt(1 + ln(factor) / ln(original)) above 1."""
    original = int(original or hf.get("max_position_embeddings", 4096))
    factor = float(scaling.get("factor") or int(hf.get("max_position_embeddings", 4096)) / original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        rope_type="longrope",
        factor=factor,
        original_max_position_embeddings=original,
        short_factor=tuple(scaling.get("short_factor") or ()),
        long_factor=tuple(scaling.get("long_factor") or ()),
        attention_factor=float(attention_factor),
    )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or {}) or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    original = scaling.get("original_max_position_embeddings")
    if hf.get("model_type") == "phi3":  # Phi3Config: legacy names, its own top-level original length
        rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
        original = hf.get("original_max_position_embeddings", PHI3_ORIGINAL_MAX_POSITIONS)
    if rope_type == "default":
        return float(theta), RopeScaling()
    if rope_type == "longrope":
        return float(theta), _longrope_from_hf(hf, scaling, original)
    return float(theta), RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original is None else int(original),
    )


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def _sliding_layers(hf: Mapping[str, Any]) -> list[int]:
    """Qwen2/Qwen3 layers that use sliding-window attention under transformers' rule: none unless
    use_sliding_window; then those `layer_types` marks, or by default the layers from max_window_layers on."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return []
    num_layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types")
    if layer_types:
        return [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    return list(range(int(hf.get("max_window_layers", num_layers)), num_layers))


def _partial_rotary_factor(hf: Mapping[str, Any]) -> float:
    """Phi-3's config.json keeps it at the top level or (transformers 5) in rope_parameters."""
    params = hf.get("rope_parameters") or {}
    return float(hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)


# transformers' Gemma2Config / Gemma3TextConfig defaults, for the keys a config.json may leave out
# (Gemma 3's multimodal checkpoints list only a few in text_config)
_GEMMA_SHARED_DEFAULTS = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
GEMMA_DEFAULTS = {
    "gemma2": _GEMMA_SHARED_DEFAULTS
    | {"max_position_embeddings": 8192, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": _GEMMA_SHARED_DEFAULTS
    | {"vocab_size": 262208, "max_position_embeddings": 131072, "rope_theta": 1e6},
}
# every n-th layer attends globally, the others through the window, when layer_types is absent
GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3_text": 6}
GEMMA3_LOCAL_THETA = 10000.0  # Gemma3TextConfig's rope_local_base_freq default


def _gemma_text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A Gemma config.json with transformers' defaults filled in; for a multimodal `gemma3` one,
    its text_config (token ids and tying from the top level where text_config has none)."""
    if hf["model_type"] == "gemma3":
        outer = {"text_of_multimodal": True} | {
            k: hf[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
            if k in hf
        }
        hf = outer | {"model_type": "gemma3_text"} | dict(hf.get("text_config") or {})
    model_type = hf["model_type"]
    hf = GEMMA_DEFAULTS[model_type] | dict(hf)
    if hf.get("use_bidirectional_attention"):
        raise ValueError(
            f"model_type {model_type!r} with use_bidirectional_attention=true is not supported (causal only)"
        )
    if not hf.get("layer_types"):
        every = int(hf.get("sliding_window_pattern") or GEMMA_GLOBAL_EVERY[model_type])
        kinds = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention"
            for i in range(int(hf["num_hidden_layers"]))
        ]
        hf["layer_types"] = kinds
    return hf


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling, float]:
    """(global theta, global scaling, sliding layers' theta): transformers 5's per-layer-type
    rope_parameters, or 4.x's rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" not in params:
        theta, scaling = _rope_from_hf(hf)
        return theta, scaling, float(hf.get("rope_local_base_freq", GEMMA3_LOCAL_THETA))
    theta, scaling = _rope_from_hf({"rope_parameters": params["full_attention"]})
    local = dict(params.get("sliding_attention") or {})
    local_type = local.get("rope_type", "default")
    if local_type != "default":
        raise ValueError(f"Gemma 3 sliding-layer rope_type {local_type!r} is not supported; valid: default")
    return theta, scaling, float(local.get("rope_theta", GEMMA3_LOCAL_THETA))


def _llama_qwen_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The LlamaConfig fields of a LLaMA / Mistral / Qwen / Phi-3 config.json that Gemma's differ in."""
    theta, scaling = _rope_from_hf(hf)
    is_phi3 = model_type == "phi3"
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        qk_norm=model_type == "qwen3",
        sliding_window=hf.get("sliding_window") if model_type in ("mistral", "phi3") else None,
        fused_qkv=is_phi3,
        fused_gate_up=is_phi3,
        partial_rotary_factor=_partial_rotary_factor(hf) if is_phi3 else 1.0,
    )


def _gemma_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The LlamaConfig fields of a Gemma 2 / Gemma 3 text config (defaults filled in)."""
    is_gemma3 = hf["model_type"] == "gemma3_text"
    theta, scaling, local_theta = _gemma3_rope(hf) if is_gemma3 else (*_rope_from_hf(hf), None)
    final_cap, attn_cap = hf.get("final_logit_softcapping"), hf.get("attn_logit_softcapping")
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        hidden_act=hf["hidden_activation"],
        sandwich_norms=True,
        unit_offset_norms=True,
        scale_embeddings=True,
        qk_norm=is_gemma3,
        query_pre_attn_scalar=int(hf["query_pre_attn_scalar"]),
        final_logit_softcapping=None if final_cap is None else float(final_cap),
        # transformers' Gemma 3 attention takes no soft-cap, whatever its config says
        attn_logit_softcapping=None if attn_cap is None or is_gemma3 else float(attn_cap),
        layer_types=tuple(hf["layer_types"]),
        sliding_window=hf.get("sliding_window"),
        text_of_multimodal=bool(hf.get("text_of_multimodal", False)),
    )


def from_hf_config(hf: Mapping[str, Any], **runtime: Any) -> LlamaConfig:
    """Build a LlamaConfig from a transformers `config.json` dict of any family in MODEL_TYPES."""
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; valid: {', '.join(MODEL_TYPES)}")
    if model_type == "gpt2":
        return _from_gpt2_config(hf, runtime)
    is_gemma = model_type.startswith("gemma")
    if is_gemma:
        hf = _gemma_text_config(hf)
    act = hf.get("hidden_activation" if is_gemma else "hidden_act", "silu")
    valid_acts = GEMMA_ACTS if is_gemma else ("silu",)
    if act not in valid_acts:
        raise ValueError(
            f"hidden_act {act!r} of model_type {model_type!r} is not supported; valid: {valid_acts}"
        )
    is_qwen = model_type in ("qwen2", "qwen3")
    is_phi3 = model_type == "phi3"
    if is_qwen and (sliding := _sliding_layers(hf)):
        raise ValueError(
            f"model_type {model_type!r} with use_sliding_window=true (sliding_window={hf['sliding_window']}, "
            f"max_window_layers={hf.get('max_window_layers')}) slides layers {sliding}: per-layer sliding "
            "windows are not supported; set use_sliding_window=false"
        )
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or (QWEN3_HEAD_DIM if model_type == "qwen3" else None)
    family = _gemma_fields(hf) if is_gemma else _llama_qwen_fields(hf, model_type)
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type not in ("qwen2", "phi3") and bool(hf.get("attention_bias", False)),
        mlp_bias=not (is_qwen or is_phi3 or is_gemma) and bool(hf.get("mlp_bias", False)),
        qkv_bias=model_type == "qwen2",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **family,
        **runtime,
    )


# GPT2Config's attention variants: only transformers' defaults are supported (key: default value).
GPT2_ATTENTION_DEFAULTS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


def _from_gpt2_config(hf: Mapping[str, Any], runtime: dict[str, Any]) -> LlamaConfig:
    """A GPT-2 `config.json` (GPT2Config's n_embd, n_layer, ... keys) as a LlamaConfig."""
    for key, default in GPT2_ATTENTION_DEFAULTS.items():
        if hf.get(key, default) != default:
            raise ValueError(
                f"gpt2 {key}={hf[key]!r} is not supported; valid: {default} (transformers' default)"
            )
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTS:
        raise ValueError(f"gpt2 activation_function {act!r} is not supported; valid: {GPT2_ACTS}")
    hidden, heads = int(hf["n_embd"]), int(hf["n_head"])
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        num_layers=int(hf["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hidden_act=act,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **GPT2_FIELDS,
        **runtime,
    )


def _to_gpt2_config(cfg: LlamaConfig) -> dict[str, Any]:
    """GPT2Config's own keys for a GPT-2 LlamaConfig."""
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.intermediate_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_position_embeddings,
        "activation_function": cfg.hidden_act,
        "layer_norm_epsilon": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        **GPT2_ATTENTION_DEFAULTS,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
    }


HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _family_fields(cfg: LlamaConfig) -> dict[str, Any]:
    """The config.json keys only cfg's family has (the rest are common to all of MODEL_TYPES)."""
    if cfg.model_type == "qwen2":  # q/k/v biases are implied by the family
        return {"use_sliding_window": False}
    if cfg.model_type == "qwen3":
        return {"use_sliding_window": False, "attention_bias": cfg.attention_bias}
    if cfg.model_type == "phi3":  # no biases; transformers reads the original length at the top level
        original = cfg.rope_scaling.original_max_position_embeddings or cfg.max_position_embeddings
        return {
            "sliding_window": cfg.sliding_window,
            "partial_rotary_factor": cfg.partial_rotary_factor,
            "original_max_position_embeddings": original,
        }
    if cfg.sandwich_norms:  # Gemma 2/3 (Gemma 3 takes rope_local_base_freq as 4.x's config.json has it)
        local_theta = {"rope_local_base_freq": cfg.rope_local_theta} if cfg.qk_norm else {}
        return local_theta | {
            "attention_bias": cfg.attention_bias,
            "hidden_activation": cfg.hidden_act,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "sliding_window": cfg.sliding_window,
            "layer_types": list(cfg.layer_types),
        }
    biases = {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    return biases | ({"sliding_window": cfg.sliding_window} if cfg.model_type == "mistral" else {})


def to_hf_config(cfg: LlamaConfig) -> dict[str, Any]:
    """The transformers config dict of cfg's family (for export and PyTorch comparison)."""
    if cfg.model_type == "gpt2":
        return _to_gpt2_config(cfg)
    rope: dict[str, Any] = {"rope_type": cfg.rope_scaling.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.rope_type != "default":
        rope["factor"] = cfg.rope_scaling.factor
    if cfg.rope_scaling.rope_type == "longrope":
        rope.update(
            original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings,
            short_factor=list(cfg.rope_scaling.short_factor),
            long_factor=list(cfg.rope_scaling.long_factor),
            attention_factor=cfg.rope_scaling.attention_factor,
        )
    if cfg.rope_scaling.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_scaling.low_freq_factor,
            high_freq_factor=cfg.rope_scaling.high_freq_factor,
            original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings,
        )
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": [HF_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        **_family_fields(cfg),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling.rope_type != "default" else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
    }
