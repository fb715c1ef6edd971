"""Build the frozen tree (base weights, linears quantized) layer by layer from any tensor source.

The tree mirrors HF LLaMA names with layers stacked on axis 0:
  {"embed_tokens": {"weight"}, "layers": {"input_layernorm": {"weight"}, "self_attn": {"q_proj":
  {"weight", "bias"?}, ..., "q_norm"/"k_norm": {"weight"} (Qwen3, Gemma 3)}, "post_attention_layernorm":
  {...}, "pre_feedforward_layernorm"/"post_feedforward_layernorm" (Gemma), "mlp": {...}}, "norm":
  {"weight"}, "lm_head": {"weight"} (untied only)}
Projections carry their family's HF module name (`linear_names`: Phi-3's fused qkv_proj and
gate_up_proj kept as stored, GPT-2's self_attn.c_attn, mlp.c_fc, ...); GPT-2 adds "embed_positions"
and a "bias" beside every norm weight. `hf_name` maps a tree name to the family's own HF tensor name
(GPT-2: transformer.h.N.attn.c_attn.weight). `linear_shapes(cfg)` lists a model's projections.
Linear weights keep PyTorch's (out, in) order, as NF4Tensor or dense arrays (GPT-2's Conv1D (in, out)
weights are transposed on the way in and out); norms are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import nf4

# HF module name of each projection role, in the attention (q k v or fused qkv, o) and the MLP
# (gate up or fused gate_up, down)
LLAMA_LINEARS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "qkv": "qkv_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "gate_up": "gate_up_proj",
    "down": "down_proj",
}
GPT2_LINEARS = {"qkv": "c_attn", "o": "c_proj", "up": "c_fc", "down": "c_proj"}
# GPT-2's HF names, dotted part by dotted part, for the tree's LLaMA-style names
GPT2_NAME_PARTS = {
    "model": "transformer",
    "layers": "h",
    "self_attn": "attn",
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "embed_tokens": "wte",
    "embed_positions": "wpe",
    "norm": "ln_f",
}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("q_norm", "k_norm")  # inside self_attn, with qk_norm (Qwen3, Gemma 3)
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # with sandwich_norms (Gemma)
QUANTIZATIONS = ("nf4", "fp4", None)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How linear weights are stored: NF4/FP4 with bitsandbytes' knobs, or dense (None)."""

    quant_type: str | None = "nf4"
    block_size: int = 64
    double_quant: bool = True
    lm_head: bool = False  # quantize the untied output projection too

    def __post_init__(self) -> None:
        if self.quant_type not in QUANTIZATIONS:
            raise ValueError(f"quantization {self.quant_type!r} unknown; valid: {QUANTIZATIONS}")


def linear_names(cfg: LlamaConfig) -> dict[str, str]:
    """The module name of each projection role in cfg's family (GPT-2's Conv1D names, else LLaMA's)."""
    return GPT2_LINEARS if cfg.model_type == "gpt2" else LLAMA_LINEARS


def hf_name(model_type: str, name: str) -> str:
    """The family's HF name of a tree name (module or tensor), e.g. GPT-2's transformer.h.3.attn.c_attn
    for model.layers.3.self_attn.c_attn; other families name theirs as the tree does."""
    if model_type != "gpt2":
        return name
    return ".".join(GPT2_NAME_PARTS.get(part, part) for part in name.split("."))


def tree_name(model_type: str, name: str) -> str:
    """The inverse of hf_name: the tree's name of a family's HF module or tensor name."""
    if model_type != "gpt2":
        return name
    ours = {hf: part for part, hf in GPT2_NAME_PARTS.items()}
    return ".".join(ours.get(part, part) for part in name.split("."))


def is_conv1d(model_type: str, name: str) -> bool:
    """Whether HF stores this tree tensor as a transformers Conv1D weight, (in, out) (GPT-2's linears)."""
    return (
        model_type == "gpt2"
        and ".layers." in name
        and name.endswith(tuple(f"{n}.weight" for n in GPT2_LINEARS.values()))
    )


def linear_shapes(cfg: LlamaConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """(out, in) of every per-layer projection, keyed by (group, name); a fused q|k|v (Phi-3,
    GPT-2) or gate|up (Phi-3) is one, stacking its parts' output rows."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    names = linear_names(cfg)
    if cfg.fused_qkv:
        attn = {("self_attn", names["qkv"]): (q + 2 * kv, d)}
    else:
        attn = {
            ("self_attn", names["q"]): (q, d),
            ("self_attn", names["k"]): (kv, d),
            ("self_attn", names["v"]): (kv, d),
        }
    if cfg.fused_gate_up:
        up = {("mlp", names["gate_up"]): (2 * f, d)}
    else:
        gate = {("mlp", names["gate"]): (f, d)} if cfg.gated_mlp else {}
        up = gate | {("mlp", names["up"]): (f, d)}
    return attn | {("self_attn", names["o"]): (d, q)} | up | {("mlp", names["down"]): (d, f)}


def has_bias(cfg: LlamaConfig, group: str, name: str) -> bool:
    """attention_bias covers q/k/v/o (GPT-2: c_attn, c_proj), qkv_bias (Qwen2) q/k/v, mlp_bias
    gate/up/down (GPT-2: c_fc, c_proj)."""
    if group == "mlp":
        return cfg.mlp_bias
    return cfg.attention_bias or (cfg.qkv_bias and name != linear_names(cfg)["o"])


def norm_params(cfg: LlamaConfig) -> tuple[str, ...]:
    """The tensors of every decoder norm: RMSNorm's weight, LayerNorm's weight and bias."""
    return ("weight", "bias") if cfg.norm_type == "layernorm" else ("weight",)


def layer_norms(cfg: LlamaConfig) -> dict[tuple[str, ...], int]:
    """Every per-layer norm, keyed by its module path in a layer, with its size."""
    names = LAYER_NORMS + (SANDWICH_NORMS if cfg.sandwich_norms else ())
    norms = {(name,): cfg.hidden_size for name in names}
    if cfg.qk_norm:
        norms |= {("self_attn", name): cfg.head_dim for name in QK_NORMS}
    return norms


@functools.partial(jax.jit, static_argnames=("quant", "dtype"))
def _quantize(w: jax.Array, quant: Quantization, dtype: str) -> nf4.NF4Tensor:
    return nf4.quantize(w.astype(dtype), quant.block_size, quant.double_quant, quant.quant_type)


def store_linear(w_OxI: Any, quant: Quantization, dtype: str):
    """One (out, in) weight as it lives in the frozen tree: NF4Tensor or dense `dtype` array. A
    weight read already quantized (a bitsandbytes 4-bit checkpoint) stays as stored, bytes and
    all, unless the run asks for dense weights."""
    if isinstance(w_OxI, nf4.NF4Tensor):
        return nf4.dequantize(w_OxI, dtype) if quant.quant_type is None else w_OxI
    if quant.quant_type is None:
        return jnp.asarray(w_OxI, dtype)
    return _quantize(jnp.asarray(w_OxI), quant, dtype)


def _check_stored_quantization(name: str, w: Any, quant: Quantization) -> None:
    """A stored 4-bit weight is taken as it is: a run asking for another 4-bit type would
    silently get the stored one, so that stops here."""
    if isinstance(w, nf4.NF4Tensor) and quant.quant_type not in (None, w.quant_type):
        raise ValueError(
            f"{name} is stored {w.quant_type} in the checkpoint; quantization={quant.quant_type!r} would "
            f"requantize it: use {w.quant_type!r} (as stored) or 'none' (dequantized)"
        )


class _LayerStack:
    """Host buffers of shape (num_layers, ...) per leaf, filled one layer at a time."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.buffers: list[np.ndarray] | None = None
        self.treedef = None

    def put(self, index: int, value: Any, name: str = "") -> None:
        leaves, treedef = jax.tree_util.tree_flatten(value)
        if self.treedef is not None and treedef != self.treedef:
            raise ValueError(
                f"{name} is stored differently from the same module of layer 0 (e.g. 4-bit in one layer, "
                "16-bit in another); every layer's module must be stored alike"
            )
        if self.buffers is None:
            self.treedef = treedef
            self.buffers = [np.empty((self.num_layers, *np.shape(x)), np.asarray(x).dtype) for x in leaves]
        for buffer, leaf in zip(self.buffers, leaves, strict=True):
            buffer[index] = np.asarray(leaf)

    def result(self) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, self.buffers)


def build_frozen(
    cfg: LlamaConfig,
    read: Callable[[str], Any],
    quant: Quantization,
    dtype: str,
) -> dict[str, Any]:
    """The frozen tree on host, layer by layer: only one layer's unquantized weights exist at a time.

    read(name) returns the tensor under its tree name (a LLaMA *ForCausalLM name, e.g.
    "model.layers.3.self_attn.q_proj.weight"; the source maps it to its own names, `hf_name`) in
    (out, in) order for linears, as a numpy array (or an NF4Tensor when the checkpoint stores that
    weight in 4 bits).
    """
    stacks: dict[tuple[str, ...], _LayerStack] = {}

    def put(key: tuple[str, ...], index: int, value: Any) -> None:
        name = f"model.layers.{index}.{'.'.join(key)}"
        stacks.setdefault(key, _LayerStack(cfg.num_layers)).put(index, value, name)

    for i in range(cfg.num_layers):
        for path in layer_norms(cfg):
            for param in norm_params(cfg):
                tensor = read(f"model.layers.{i}.{'.'.join(path)}.{param}")
                put((*path, param), i, np.asarray(tensor, np.float32))
        for (group, name), (out_dim, in_dim) in linear_shapes(cfg).items():
            w = read(f"model.layers.{i}.{group}.{name}.weight")
            _check_stored_quantization(f"model.layers.{i}.{group}.{name}.weight", w, quant)
            if tuple(np.shape(w)) != (out_dim, in_dim):
                raise ValueError(
                    f"layer {i} {group}.{name}.weight has shape {tuple(np.shape(w))}, "
                    f"expected {(out_dim, in_dim)} from the config"
                )
            put((group, name, "weight"), i, store_linear(w, quant, dtype))
            if has_bias(cfg, group, name):
                put(
                    (group, name, "bias"),
                    i,
                    np.asarray(read(f"model.layers.{i}.{group}.{name}.bias")).astype(jnp.dtype(dtype)),
                )
    layers: dict[str, Any] = {}
    for key, stack in stacks.items():
        node = layers
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = stack.result()
    frozen = {
        "embed_tokens": {"weight": np.asarray(read("model.embed_tokens.weight")).astype(jnp.dtype(dtype))},
        "layers": layers,
        "norm": {p: np.asarray(read(f"model.norm.{p}"), np.float32) for p in norm_params(cfg)},
    }
    if cfg.position_embedding == "learned":
        table = np.asarray(read("model.embed_positions.weight")).astype(jnp.dtype(dtype))
        frozen["embed_positions"] = {"weight": table}
    if not cfg.tie_word_embeddings:
        head = read("lm_head.weight")
        _check_stored_quantization("lm_head.weight", head, quant)
        stored_4bit = isinstance(head, nf4.NF4Tensor)
        head_quant = quant if quant.lm_head or stored_4bit else Quantization(None)
        frozen["lm_head"] = {"weight": jax.device_get(store_linear(head, head_quant, dtype))}
    return frozen


def _random_table(
    key: jax.Array, shape: tuple[int, int], dtype: str, std: float, rows: int = 4096
) -> jax.Array:
    """A (vocab, hidden) normal(0, std) table written `rows` rows at a time into its buffer, so
    the random bits and float32 values of only one block are alive (whole: ~8x the table)."""
    blocks = -(-shape[0] // rows)

    def write_block(i: jax.Array, table: jax.Array) -> jax.Array:
        block = std * jax.random.normal(jax.random.fold_in(key, i), (rows, shape[1]), jnp.float32)
        start = jnp.minimum(i * rows, shape[0] - rows)  # the last block overlaps its neighbour
        return jax.lax.dynamic_update_slice(table, block.astype(dtype), (start, 0))

    if shape[0] <= rows:
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.lax.fori_loop(0, blocks, write_block, jnp.zeros(shape, dtype))


def random_init(
    cfg: LlamaConfig,
    rng: jax.Array,
    quant: Quantization = Quantization(),
    dtype: str = "bfloat16",
    std: float = 0.02,
    shardings: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """A frozen tree of random weights built on the device, quantized one layer at a time.

    Each projection is generated for all layers inside `lax.map`, so device memory holds one
    layer's 16-bit weight next to the quantized stack: a 70B-shape model fits where its NF4 form fits.
    `shardings(abstract tree)` places the result on a mesh as it is built: each device keeps only
    its share (the random values do not depend on the placement).
    """
    shapes = linear_shapes(cfg)

    def stacked_linear(key: jax.Array, shape: tuple[int, int]) -> Any:
        """One projection for every layer; lax.map keeps a single layer's 16-bit weight alive."""

        def one(k: jax.Array) -> Any:
            return store_linear((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype), quant, dtype)

        return jax.lax.map(one, jax.random.split(key, cfg.num_layers))

    def build(key: jax.Array) -> dict[str, Any]:
        k_embed, k_head, k_layers = jax.random.split(key, 3)
        embed = _random_table(k_embed, (cfg.vocab_size, cfg.hidden_size), dtype, std)
        layers: dict[str, Any] = {}
        identity = 0.0 if cfg.unit_offset_norms else 1.0  # the norm weight that scales by 1

        def norm(*shape: int) -> dict[str, jax.Array]:
            weight = {"weight": jnp.full(shape, identity, jnp.float32)}
            return weight | ({"bias": jnp.zeros(shape, jnp.float32)} if "bias" in norm_params(cfg) else {})

        for (*groups, name), size in layer_norms(cfg).items():
            node = layers.setdefault(groups[0], {}) if groups else layers
            node[name] = norm(cfg.num_layers, size)
        for key_i, ((group, name), shape) in zip(
            jax.random.split(k_layers, len(shapes)), shapes.items(), strict=True
        ):
            entry = {"weight": stacked_linear(key_i, shape)}
            if has_bias(cfg, group, name):
                entry["bias"] = jnp.zeros((cfg.num_layers, shape[0]), dtype)
            layers.setdefault(group, {})[name] = entry
        frozen = {"embed_tokens": {"weight": embed}, "layers": layers, "norm": norm(cfg.hidden_size)}
        if cfg.position_embedding == "learned":
            shape = (cfg.max_position_embeddings, cfg.hidden_size)
            table = _random_table(jax.random.fold_in(key, 3), shape, dtype, std)
            frozen["embed_positions"] = {"weight": table}
        if not cfg.tie_word_embeddings:
            head = _random_table(k_head, (cfg.vocab_size, cfg.hidden_size), dtype, std)
            head_quant = quant if quant.lm_head else Quantization(None)
            frozen["lm_head"] = {"weight": store_linear(head, head_quant, dtype)}
        return frozen

    if shardings is None:
        return jax.jit(build)(rng)
    placed = shardings(jax.eval_shape(build, rng))
    # XLA's GPU compiler refuses a jitted output placed in host memory when it is computed on the
    # device: the tables are built on the device alone first and moved out before the layers are
    # built, so they are never on the device beside the layers
    tables = [name for name in TABLES if name in placed]
    on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), placed)
    rest = [name for name in placed if name not in tables]

    def part(names: list[str], targets: dict[str, Any]) -> dict[str, Any]:
        """The named parts of the tree, built by one jit that computes only those (XLA drops the rest)."""
        pick = lambda key: {name: value for name, value in build(key).items() if name in names}  # noqa: E731
        return jax.jit(pick, out_shardings={name: targets[name] for name in names})(rng)

    moved = jax.device_put(part(tables, on_device), {name: placed[name] for name in tables})
    return moved | part(rest, placed)


TABLES = ("embed_tokens", "embed_positions", "lm_head")  # (rows, hidden) lookup and output tables


def tables_in_host_memory(
    shardings: dict[str, Any], embeddings: bool = True, head: bool = True
) -> dict[str, Any]:
    """A frozen tree's shardings with its lookup tables (`embeddings`) and output head (`head`)
    moved to pinned host memory, each device's share where it was. A token table in host memory
    is looked up on the host (train/embedding_lookup.py: a batch carries its rows), a position
    table is copied in for its lookup; the head is copied in at the loss (after the layers,
    `Llama.head`), whose gradient is formed in the forward pass, so no table is on the device
    during the backward pass. A tied table (no lm_head) serves as the head, so it moves with `head`."""
    tied = "lm_head" not in shardings
    wanted = {"embed_tokens": head if tied else embeddings, "embed_positions": embeddings, "lm_head": head}
    to_host = lambda s: s.with_memory_kind("pinned_host")  # noqa: E731
    return {
        name: jax.tree.map(to_host, part) if wanted.get(name) else part for name, part in shardings.items()
    }
