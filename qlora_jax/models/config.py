"""LlamaConfig: the architecture of a LLaMA-style decoder and how to run it, read from HF or GGUF.

One config covers every supported family (MODEL_TYPES): a family is a set of field values
(Qwen2: qkv_bias, Qwen3: qk_norm, Mistral: sliding_window, GPT-2: GPT2_FIELDS), which the decoder
reads; nothing branches on the family's name except the HF config reader and writer here and
the HF tensor names (models/frozen.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")  # transformers' model_type values we load
NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_EMBEDDINGS = ("rope", "learned")
HIDDEN_ACTS = ("silu", "gelu_new", "gelu")  # transformers' names; gelu_new is GELU's tanh approximation
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
# A family's own field and the fields no HF class of that family has (Qwen2, Qwen3).
FAMILY_CLASHES = {
    "qkv_bias": ("qk_norm", "attention_bias", "mlp_bias", "sliding_window"),
    "qk_norm": ("mlp_bias", "sliding_window"),
}
QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default when config.json has no head_dim
REMAT_POLICIES = (
    "auto",  # offload below 16,384 tokens per row, offload_attention from there (decoder.py)
    "none",  # keep every activation (no rematerialization)
    "full",  # save only the layer inputs, recompute the rest in backward
    "offload",  # as full, with the saved layer inputs in pinned host memory (copies overlap compute)
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
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; valid: {ROPE_TYPES}")


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
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` keys only
    norm_type: str = "rmsnorm"  # "layernorm": LayerNorm with a bias (GPT-2)
    position_embedding: str = "rope"  # "learned": a table of max_position_embeddings rows (GPT-2)
    hidden_act: str = "silu"  # the MLP's activation (HIDDEN_ACTS)
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-2's c_fc, c_proj)
    fused_qkv: bool = False  # one projection whose output features are q, then k, then v
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # How to run it (not part of the checkpoint).
    dtype: str = "bfloat16"  # compute dtype of matmuls and the residual stream
    scan_layers: bool = True  # False unrolls the layer loop (longer compile, sometimes faster)
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
        fields_on = {
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window is not None,
        }
        for field, clashing in FAMILY_CLASHES.items():
            clash = [name for name in clashing if fields_on[name]]
            if fields_on[field] and clash:
                raise ValueError(f"{field} with {', '.join(clash)} matches no supported family {MODEL_TYPES}")

    def _check_gpt2_fields(self) -> None:
        """GPT-2's fields come as a set (no other supported family has any of them)."""
        gpt2_on = (self.norm_type == "layernorm", self.position_embedding == "learned", not self.gated_mlp)
        if not any(gpt2_on):
            return
        wrong = [f"{k}={getattr(self, k)!r}" for k, v in GPT2_FIELDS.items() if getattr(self, k) != v]
        wrong += [f"{k}=True" for k in ("qkv_bias", "qk_norm") if getattr(self, k)]
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
        layer = attn + mlp_linears * d * f + 2 * norm + bias + qk_norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        positions = self.max_position_embeddings * d if self.position_embedding == "learned" else 0
        return self.vocab_size * d + positions + self.num_layers * layer + norm + head


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or {}) or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), RopeScaling()
    original = scaling.get("original_max_position_embeddings")
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


def from_hf_config(hf: Mapping[str, Any], **runtime: Any) -> LlamaConfig:
    """Build a LlamaConfig from a transformers `config.json` dict of any family in MODEL_TYPES."""
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; valid: {', '.join(MODEL_TYPES)}")
    if model_type == "gpt2":
        return _from_gpt2_config(hf, runtime)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; LLaMA-family models use 'silu'")
    is_qwen = model_type in ("qwen2", "qwen3")
    if is_qwen and (sliding := _sliding_layers(hf)):
        raise ValueError(
            f"model_type {model_type!r} with use_sliding_window=true (sliding_window={hf['sliding_window']}, "
            f"max_window_layers={hf.get('max_window_layers')}) slides layers {sliding}: per-layer sliding "
            "windows are not supported; set use_sliding_window=false"
        )
    theta, scaling = _rope_from_hf(hf)
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or (QWEN3_HEAD_DIM if model_type == "qwen3" else None)
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=not is_qwen and bool(hf.get("mlp_bias", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
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
    if act not in HIDDEN_ACTS[1:]:
        raise ValueError(f"gpt2 activation_function {act!r} is not supported; valid: {HIDDEN_ACTS[1:]}")
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
}


def _family_fields(cfg: LlamaConfig) -> dict[str, Any]:
    """The config.json keys only cfg's family has (the rest are common to all of MODEL_TYPES)."""
    if cfg.model_type == "qwen2":  # q/k/v biases are implied by the family
        return {"use_sliding_window": False}
    if cfg.model_type == "qwen3":
        return {"use_sliding_window": False, "attention_bias": cfg.attention_bias}
    biases = {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    return biases | ({"sliding_window": cfg.sliding_window} if cfg.model_type == "mistral" else {})


def to_hf_config(cfg: LlamaConfig) -> dict[str, Any]:
    """The transformers config dict of cfg's family (for export and PyTorch comparison)."""
    if cfg.model_type == "gpt2":
        return _to_gpt2_config(cfg)
    rope: dict[str, Any] = {"rope_type": cfg.rope_scaling.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.rope_type != "default":
        rope["factor"] = cfg.rope_scaling.factor
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
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling.rope_type != "default" else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
    }
