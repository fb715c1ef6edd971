"""Presets, HF config round trips, random init and the errors users meet first."""

import jax
import numpy as np
import pytest

from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig, from_hf_config, to_hf_config
from qlora_jax.models.presets import PRESETS, preset
from qlora_jax.quant import nf4
from tests.models.hf_reference import family_config, save, small_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_config(name):
    import transformers

    from qlora_jax.compare.torch_reference import hf_config

    cfg = PRESETS[name]
    hf_cfg = hf_config(cfg)  # the family's own transformers config class
    assert hf_cfg.model_type == cfg.model_type
    assert from_hf_config(hf_cfg.to_dict()) == cfg
    # parameter counts equal what transformers builds on the meta device for the same config
    with __import__("torch").device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert type(ref).__name__ == to_hf_config(cfg)["architectures"][0]
    assert cfg.num_params == sum(p.numel() for p in ref.parameters())


def test_published_sizes():
    assert round(PRESETS["llama2-7b"].num_params / 1e9, 2) == 6.74
    assert round(PRESETS["llama3-8b"].num_params / 1e9, 2) == 8.03
    assert round(PRESETS["llama2-70b"].num_params / 1e9, 1) == 69.0
    assert round(PRESETS["qwen2.5-7b"].num_params / 1e9, 2) == 7.62  # model card: 7.61B (7.615...)
    assert round(PRESETS["qwen3-8b"].num_params / 1e9, 2) == 8.19  # model card: 8.2B
    assert round(PRESETS["phi-3-mini"].num_params / 1e9, 2) == 3.82  # model card: 3.8B
    assert round(PRESETS["gemma-2-9b"].num_params / 1e9, 2) == 9.24  # model card: 9.24B
    assert round(PRESETS["gemma-3-12b"].num_params / 1e9, 2) == 11.77  # 12.2B less the 0.42B vision tower
    assert PRESETS["gpt2"].num_params == 124_439_808  # GPT2LMHeadModel of openai-community/gpt2


def test_random_init_quantizes_every_layer_and_runs():
    model, frozen = llama.random_init(small_config(num_layers=3), quantization="nf4", dtype="float32")
    q = frozen["layers"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(q, nf4.NF4Tensor) and q.stack_shape == (3,) and q.double_quant
    # layers differ (each got its own key) and the quantized values are near the 0.02 init scale
    w = np.asarray(nf4.dequantize(q))
    assert not np.array_equal(w[0], w[1]) and 0.015 < w.std() < 0.025
    logits = jax.jit(model.apply)(frozen, None, np.zeros((1, 8), np.int32))  # one compile, not one per op
    assert logits.shape == (1, 8, 256) and np.isfinite(np.asarray(logits)).all()


def test_random_init_dense_and_untied_head():
    _, frozen = llama.random_init(
        small_config(tie_word_embeddings=False), quantization=None, dtype="bfloat16"
    )
    assert frozen["layers"]["mlp"]["up_proj"]["weight"].shape == (2, 192, 128)
    assert frozen["lm_head"]["weight"].dtype == jax.numpy.bfloat16


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: preset("llama-9b"), "unknown model preset 'llama-9b'"),
        (lambda: small_config(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads=3"),
        (lambda: small_config(remat_policy="some"), "remat_policy 'some'"),
        (
            lambda: from_hf_config({"model_type": "gemma"}),
            "^model_type 'gemma' is not supported; valid: llama, mistral, qwen2, qwen3, phi3, gemma2, "
            "gemma3_text, gemma3, gpt2$",
        ),
        (lambda: small_config(qkv_bias=True, qk_norm=True), "qkv_bias with qk_norm matches no"),
        (lambda: small_config(fused_gate_up=True), "need fused_qkv=True and fused_gate_up=True"),
        (lambda: family_config("phi3", mlp_bias=True), "fused_gate_up with mlp_bias matches no"),
        (
            lambda: family_config("phi3", partial_rotary_factor=0.75),
            r"^longrope short_factor/long_factor have \[8\] values; the rotary dimension 24 needs 12 each$",
        ),
        (
            lambda: from_hf_config(
                to_hf_config(family_config("gpt2")) | {"scale_attn_by_inverse_layer_idx": True}
            ),
            r"^gpt2 scale_attn_by_inverse_layer_idx=True is not supported; valid: False",
        ),
        (
            lambda: from_hf_config(to_hf_config(family_config("gpt2")) | {"activation_function": "relu"}),
            r"^gpt2 activation_function 'relu' is not supported; valid: \('gelu_new', 'gelu'\)$",
        ),
        (lambda: small_config(norm_type="layernorm"), r"^GPT-2's fields .* got position_embedding='rope'"),
        (lambda: small_config(norm_type="batchnorm"), r"^norm_type 'batchnorm' is not supported"),
        (
            lambda: from_hf_config(to_hf_config(small_config()) | {"rope_scaling": {"rope_type": "yarn"}}),
            "yarn",
        ),
        (lambda: llama.from_pretrained("/no/such/model"), "/no/such/model"),
        (lambda: llama.from_pretrained("/tmp", quantization="int3"), "int3"),
    ],
)
def test_bad_input_is_named(make, match):
    with pytest.raises((ValueError, FileNotFoundError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(family="gpt2", fused_gate_up=True), r"^GPT-2's fields .* got fused_gate_up=True$"),
        (dict(family="gpt2", sandwich_norms=True), r"^GPT-2's fields .* got sandwich_norms=True$"),
        (dict(family="gpt2", partial_rotary_factor=0.5), r"^GPT-2's fields .* got partial_rotary_factor=0.5"),
        (dict(family="gpt2", hidden_act="silu"), r"^hidden_act 'silu' of model_type 'gpt2' is not supported"),
        (dict(family="gemma2", hidden_act="gelu_new"), r"^hidden_act 'gelu_new' of model_type 'gemma2'"),
        (dict(family="phi3", hidden_act="gelu"), r"^hidden_act 'gelu' of model_type 'phi3' is not supported"),
        (dict(family="phi3", sandwich_norms=True), r"^fused_gate_up with sandwich_norms matches no"),
        (dict(family="gemma3", fused_qkv=True), r"^fused_qkv is Phi-3's .* alone it matches no"),
        (dict(family="llama", hidden_act="swish"), r"^hidden_act 'swish' is not supported; valid: \("),
    ],
)
def test_fields_of_different_families_together_are_refused_in_one_line(changes, match):
    """Phi-3's, Gemma's and GPT-2's fields and activations do not mix: one line naming the clash."""
    family = changes.pop("family")
    with pytest.raises(ValueError, match=match) as err:
        family_config(family, **changes)
    assert "\n" not in str(err.value)


def test_qwen_config_json_fields_as_transformers_reads_them():
    qwen2 = to_hf_config(family_config("qwen2")) | {"sliding_window": 131072, "max_window_layers": 28}
    assert from_hf_config(qwen2).sliding_window is None  # Qwen2.5's config.json: window off
    with pytest.raises(ValueError, match=r"^model_type 'qwen2' with use_sliding_window=true .* layers \[1\]"):
        from_hf_config(qwen2 | {"use_sliding_window": True, "max_window_layers": 1})
    qwen3 = to_hf_config(family_config("qwen3"))
    assert from_hf_config(qwen3, dtype="float32") == family_config("qwen3")
    del qwen3["head_dim"]  # Qwen3Config's default is 128, not hidden / heads
    assert from_hf_config(qwen3).head_dim == 128


def test_phi3_config_json_fields_as_transformers_reads_them():
    """Phi-3-128k's config.json (rope type under the legacy key "type", no factor or attention factor,
    the original length at the top level) and Phi-4-mini's partial rotary: our RoPE parameters are those
    transformers' Phi3RotaryEmbedding derives (attention factor to 1e-12, float64 vs our float64)."""
    import transformers

    factors = [1.0 + 0.125 * i for i in range(12)]
    published = to_hf_config(family_config("phi3")) | {
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {"type": "longrope", "short_factor": factors, "long_factor": factors[::-1]},
        "sliding_window": 262144,
    }
    ours = from_hf_config(published)
    theirs = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(transformers.Phi3Config(**published))
    assert (
        ours.rope_scaling.rope_type == "longrope" and ours.rotary_dim == 24 and ours.sliding_window == 262144
    )
    assert ours.rope_scaling.original_max_position_embeddings == 4096 and ours.rope_scaling.factor == 32.0
    assert abs(ours.rope_scaling.attention_factor - theirs.attention_scaling) < 1e-12
    assert from_hf_config(to_hf_config(ours)) == ours
    mini_4k = published | {
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "partial_rotary_factor": None,
    }
    assert (
        from_hf_config(mini_4k).rope_scaling.rope_type == "default"
        and from_hf_config(mini_4k).rotary_dim == 32
    )


def test_gemma_config_json_fields_as_transformers_reads_them():
    # a multimodal gemma3 config.json as published: 4.x rope keys, a text_config of a few keys
    # (the rest Gemma3TextConfig's defaults), the sliding pattern as an int, eos at the top level
    published = {
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 3840,
            "intermediate_size": 15360,
            "num_hidden_layers": 48,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
            "sliding_window_pattern": 6,
        },
    }
    assert from_hf_config(published) == PRESETS["gemma-3-12b"].replace(text_of_multimodal=True)
    gemma2 = to_hf_config(family_config("gemma2"))
    assert from_hf_config(gemma2, dtype="float32") == family_config("gemma2")
    del gemma2["layer_types"], gemma2["final_logit_softcapping"]  # Gemma2Config's defaults
    defaults = from_hf_config(gemma2 | {"num_hidden_layers": 4})
    assert defaults.layer_types == ("sliding_attention", "full_attention") * 2
    assert defaults.final_logit_softcapping == 30.0
    with pytest.raises(ValueError, match="^model_type 'gemma2' with use_bidirectional_attention=true"):
        from_hf_config(gemma2 | {"use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="^layer_types, rope_local_theta without sandwich_norms"):
        small_config(layer_types=("full_attention",) * 2, rope_local_theta=1e4)


def test_checkpoint_with_wrong_shape_names_the_tensor(tmp_path):
    from tests.models.hf_reference import hf_model

    path = save(hf_model(small_config()), tmp_path / "hf")
    import json

    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 256
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(
        ValueError, match=r"layer 0 mlp.gate_proj.weight has shape \(192, 128\), expected \(256, 128\)"
    ):
        llama.from_pretrained(path, quantization=None)


def test_llama_config_is_hashable_for_jit():
    assert hash(small_config()) == hash(small_config()) and isinstance(small_config(), LlamaConfig)


def test_base_fingerprint_is_the_same_in_a_second_process(tiny_model, tmp_path):
    """Resume compares the base's fingerprint across processes: random init and loading must give
    the same NF4 bytes in a fresh process (on the GPU the double-quant offset once did not)."""
    import sys

    from qlora_jax.io.checkpoint import base_fingerprint
    from tests.conftest import cli_env, run_cli

    script = tmp_path / "fingerprints.py"
    script.write_text(
        "import sys\n"
        "from qlora_jax.io.checkpoint import base_fingerprint\n"
        "from qlora_jax.models import llama\n"
        "from tests.models.hf_reference import small_config\n"
        "model, frozen = llama.random_init(small_config(num_layers=2), seed=3)\n"
        "print(base_fingerprint(model.config, frozen))\n"
        "model, frozen = llama.from_pretrained(sys.argv[1], 'nf4')\n"
        "print(base_fingerprint(model.config, frozen))\n"
    )
    # compiled as this process compiles (not the CLI tests' unoptimized code, whose float rounding
    # of random_init's draws differs): the same program in a fresh process
    out = run_cli([sys.executable, str(script), tiny_model], env=cli_env(optimized=True))
    assert out.returncode == 0, out.stderr[-3000:]
    model, frozen = llama.random_init(small_config(num_layers=2), seed=3)
    loaded_model, loaded = llama.from_pretrained(tiny_model, "nf4")
    here = [base_fingerprint(model.config, frozen), base_fingerprint(loaded_model.config, loaded)]
    assert out.stdout.split() == here


def test_offloaded_tables_are_placed_in_host_memory_as_built_with_the_same_values(tiny_model):
    """offload_embeddings and offload_head put the embedding and head tables in pinned host memory
    as they are built or loaded (so they never add to the device's load peak) and change nothing
    else: the built or loaded base's fingerprint is the same, so a run may resume with the options
    flipped.
    (The GPU compiler also refuses a jitted output in host memory computed on the device, which
    the CPU accepts: random_init builds the tables on the device and moves them; the bench's
    host-table rows run that path on the GPU.)"""
    from qlora_jax.io.checkpoint import base_fingerprint
    from qlora_jax.models.frozen import TABLES

    cfg = small_config(num_layers=2, tie_word_embeddings=False)
    both = {"offload_embeddings": True, "offload_head": True}
    built = llama.random_init(cfg, **both)[1]
    assert base_fingerprint(cfg, built) == base_fingerprint(cfg, llama.random_init(cfg)[1])
    model, loaded = llama.from_pretrained(tiny_model, "nf4", **both)
    for name, host in {"random_init": built, "from_pretrained": loaded}.items():
        kinds = {part: {x.sharding.memory_kind for x in jax.tree.leaves(host[part])} for part in host}
        assert {kinds[t] == {"pinned_host"} for t in TABLES if t in kinds} == {True}, (name, kinds)
        assert kinds["layers"] == {"device"}, name
    on_device = llama.from_pretrained(tiny_model, "nf4")[1]
    assert base_fingerprint(model.config, loaded) == base_fingerprint(model.config, on_device)


@pytest.mark.parametrize("tied", [False, True])
def test_each_table_goes_to_host_memory_with_its_own_option(tied):
    """offload_embeddings moves the lookup tables (tokens; GPT-2's positions), offload_head the
    output head; a tied token table is the head too, so it moves with offload_head alone (the loss
    reads it whole every step)."""
    from qlora_jax.models.frozen import tables_in_host_memory

    cfg = family_config("gpt2", num_layers=1, tie_word_embeddings=tied)
    shardings = jax.tree.map(lambda x: x.sharding, llama.random_init(cfg)[1])
    for embeddings in (False, True):
        for head in (False, True):
            placed = tables_in_host_memory(shardings, embeddings, head)
            on_host = {
                part
                for part in placed
                if {s.memory_kind for s in jax.tree.leaves(placed[part])} == {"pinned_host"}
            }
            wanted = {"embed_tokens": head if tied else embeddings, "embed_positions": embeddings}
            wanted |= {} if tied else {"lm_head": head}
            assert on_host == {part for part, moves in wanted.items() if moves}, (embeddings, head)
