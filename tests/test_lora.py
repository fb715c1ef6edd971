"""LoRA config semantics against peft: target matching, parameter counts, init, merge/unmerge."""

from __future__ import annotations

import contextlib
import io

import jax
import numpy as np
import peft
import pytest
import torch

from qlora_jax import lora as lora_lib
from qlora_jax.compare.torch_reference import peft_config
from qlora_jax.models import llama
from tests.models.hf_reference import hf_model, rel_err, save, small_config

# one compiled forward per config and weight tree: eager apply dispatches (and compiles) op by op
_forward = jax.jit(lambda model, frozen, lora, tokens: model.apply(frozen, lora, tokens), static_argnums=0)

CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "qv": dict(target_modules=("q_proj", "v_proj"), r=4, alpha=16),
    "regex": dict(target_modules=r".*\.mlp\.(gate|up)_proj", r=2),
    "layers": dict(target_modules=("q_proj", "down_proj"), layers_to_transform=(1,)),
    "patterns": dict(
        target_modules="all-linear",
        rank_pattern={"q_proj": 16, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"down_proj": 4.0},
        use_rslora=True,
    ),
    "bias-all": dict(target_modules=("q_proj",), bias="all"),
    "bias-lora-only": dict(target_modules=("q_proj", "k_proj"), bias="lora_only"),
}


def _peft_model(model_cfg, cfg):
    return peft.get_peft_model(hf_model(model_cfg), peft_config(cfg))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trainable_parameter_line_equals_peft(name):
    model_cfg = small_config(attention_bias=True, mlp_bias=True)
    cfg = lora_lib.LoraConfig(**CONFIGS[name])
    ref = _peft_model(model_cfg, cfg)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ref.print_trainable_parameters()
    assert lora_lib.trainable_parameters_line(model_cfg, cfg) == buffer.getvalue().strip()
    assert lora_lib.count_parameters(model_cfg, cfg) == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_targets_and_scales_equal_peft(name):
    model_cfg = small_config(attention_bias=True)
    cfg = lora_lib.LoraConfig(**CONFIGS[name])
    ref = _peft_model(model_cfg, cfg)
    expected = {
        n.removeprefix("base_model.model."): m.scaling["default"]
        for n, m in ref.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    names = lora_lib.targeted_modules(model_cfg, cfg)
    assert sorted(names) == sorted(expected)
    assert {n: cfg.scale_for(n) for n in names} == pytest.approx(expected, rel=1e-12)


def test_target_matching_nothing_lists_available_modules():
    cfg = lora_lib.LoraConfig(target_modules=("query", "value"))
    with pytest.raises(
        ValueError, match=r"matches no module; available: \['down_proj', 'gate_proj', 'k_proj'"
    ):
        lora_lib.targeted_modules(small_config(), cfg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(r=0, target_modules="all-linear"), "rank r"),
        (dict(bias="some", target_modules="all-linear"), "bias"),
        (dict(target_modules=None), "target_modules"),
        (dict(init="pissa", target_modules="all-linear"), "init"),
        (dict(dropout=1.0, target_modules="all-linear"), "dropout"),
        (
            dict(target_modules="all-linear", layers_to_transform=(0,)),
            "layers_to_transform needs target_modules",
        ),
    ],
)
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_lib.LoraConfig(**kwargs)


def test_init_follows_peft_distributions():
    model_cfg = small_config(num_layers=8)
    _, frozen = llama.random_init(model_cfg, quantization=None, dtype="float32")
    tree = lora_lib.init_lora(
        jax.random.key(0), frozen, model_cfg, lora_lib.LoraConfig(r=8, target_modules="all-linear")
    )
    q = tree["layers"]["mlp"]["gate_proj"]
    a = np.asarray(q["a"])  # (8, 128, 8): kaiming-uniform on (r, in) = U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / np.sqrt(128)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform std = bound/sqrt(3)
    assert not np.array_equal(a[0], a[1])  # every layer draws its own A
    assert np.all(np.asarray(q["b"]) == 0) and np.allclose(q["scale"], 1.0)
    gauss = lora_lib.init_lora(
        jax.random.key(0),
        frozen,
        model_cfg,
        lora_lib.LoraConfig(r=8, target_modules="all-linear", init="gaussian"),
    )
    assert abs(np.asarray(gauss["layers"]["mlp"]["gate_proj"]["a"]).std() - 1 / 8) < 0.01


def test_merge_gives_the_adapted_model_and_unmerge_restores(tmp_path):
    model_cfg = small_config()
    model, frozen = llama.from_pretrained(
        save(hf_model(model_cfg), tmp_path / "hf"), quantization=None, dtype="float32"
    )
    cfg = lora_lib.LoraConfig(
        r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), layers_to_transform=(0,)
    )
    tree = lora_lib.init_lora(jax.random.key(1), frozen, model.config, cfg)
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
            if p[-1].key == "b"
            else x
        ),
        tree,
    )
    tree["layers"]["mlp"]["up_proj"]["b"][1] = 0.0  # padding layers stay zero
    tokens = np.arange(16, dtype=np.int32)[None]
    merged = lora_lib.merge(frozen, tree)
    assert (
        rel_err(_forward(model, merged, None, tokens), np.asarray(_forward(model, frozen, tree, tokens)))
        < 1e-6
    )
    restored = lora_lib.unmerge(merged, tree)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_merge_of_nf4_base_dequantizes_adapted_modules():
    model_cfg = small_config()
    model, frozen = llama.random_init(model_cfg, quantization="nf4", dtype="float32")
    cfg = lora_lib.LoraConfig(r=4, target_modules=("v_proj",))
    tree = lora_lib.init_lora(jax.random.key(1), frozen, model_cfg, cfg)
    merged = lora_lib.merge(frozen, tree)
    assert merged["layers"]["self_attn"]["v_proj"]["weight"].shape == (2, 64, 128)
    assert (
        merged["layers"]["self_attn"]["q_proj"]["weight"] is frozen["layers"]["self_attn"]["q_proj"]["weight"]
    )
    tokens = np.arange(8, dtype=np.int32)[None]
    assert (
        rel_err(_forward(model, merged, None, tokens), np.asarray(_forward(model, frozen, tree, tokens)))
        < 1e-6
    )


def test_dropout_needs_an_rng_and_changes_outputs():
    model_cfg = small_config()
    model, frozen = llama.random_init(model_cfg, quantization=None, dtype="float32")
    tree = lora_lib.init_lora(
        jax.random.key(1), frozen, model_cfg, lora_lib.LoraConfig(target_modules="all-linear")
    )
    tree = jax.tree.map(lambda x: x + 0.1, tree)
    tokens = np.arange(8, dtype=np.int32)[None]
    plain = np.asarray(model.apply(frozen, tree, tokens, lora_dropout=0.5))
    same = np.asarray(model.apply(frozen, tree, tokens))
    dropped = np.asarray(model.apply(frozen, tree, tokens, lora_dropout=0.5, rng=jax.random.key(0)))
    np.testing.assert_array_equal(plain, same)
    assert not np.allclose(dropped, plain)
    torch.manual_seed(0)  # keep torch's global RNG untouched by this test's imports
