"""Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 and GPT-2 against transformers and peft on small random
models of each family (fp32, CPU): loading (safetensors, GGUF, Gemma 3's multimodal checkpoint),
logits with padding and packing, greedy generation, PEFT adapters both ways, merged export,
sharding and random init. LLaMA's own tests (test_llama_*.py, tests/io) cover the rest.

Tolerance 1e-4 relative to the largest logit: both sides compute in float32 with different
summation orders (observed ~1e-6); a missing q/k/v bias or q/k norm, a wrong head_dim, GPT-2's
position table or LayerNorm bias left out or a Conv1D weight not transposed, moves logits by 1e-2
or more, as does any Gemma difference (a soft-cap left out, the attention scale taken from
head_dim, a window on the wrong layer, Gemma 3's local RoPE base: 3e-2 to 1). Phi-3's RoPE tables
(partial rotary, LongRoPE's short and long factors and attention factor) against transformers'
own: 1e-6 relative, float32 cos/sin of the same angles.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from qlora_jax import lora as lora_lib
from qlora_jax import sharding
from qlora_jax.compare.torch_reference import peft_config
from qlora_jax.io import hf_export
from qlora_jax.io import peft as peft_io
from qlora_jax.models import llama
from qlora_jax.models.generation import generate
from qlora_jax.models.presets import preset
from qlora_jax.models.rope import cos_sin
from qlora_jax.quant import nf4
from tests.models.hf_reference import family_config, hf_logits, hf_model, rel_err, save
from tests.peft_reference import randomize_b

TOL = 1e-4
FAMILIES = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2")
# bias="all": Qwen2's frozen q/k/v biases train too, GPT-2's linear and LayerNorm biases (as peft
# marks every *.bias), so adapters and merged exports carry them
LORA = lora_lib.LoraConfig(r=4, alpha=8, target_modules="all-linear", bias="all")


# one compiled forward per family and shape (eager apply dispatches and compiles op by op): every
# (2, 10) batch through an adapter shares one
_logits = jax.jit(
    lambda model, frozen, lora, tokens, **kw: model.apply(frozen, lora, tokens, **kw), static_argnums=0
)


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, length), dtype=np.int32)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, transformers reference, its HF directory, our fp32 model and frozen tree)."""
    ref = hf_model(family_config(request.param))
    path = save(ref, tmp_path_factory.mktemp(request.param) / "hf")
    model, frozen = llama.from_pretrained(path, quantization=None, dtype="float32")
    return request.param, ref, path, model, frozen


@pytest.fixture(scope="module")
def adapted(family):
    """An adapter of LORA with random nonzero B and biases moved off their frozen values."""
    _, _, _, model, frozen = family
    tree = jax.tree.map(np.array, lora_lib.init_lora(jax.random.key(0), frozen, model.config, LORA))
    rng = np.random.default_rng(0)
    for modules in tree["layers"].values():
        if lora_lib.is_norm_bias(modules):  # GPT-2's ln_1 / ln_2 biases
            modules["bias"] = modules["bias"] + np.float32(0.1)
            continue
        for adapter in modules.values():
            adapter["b"] = (0.05 * rng.standard_normal(adapter["b"].shape)).astype(np.float32)
            if "bias" in adapter:
                adapter["bias"] = adapter["bias"] + np.float32(0.1)
    if "norm" in tree:  # GPT-2's ln_f bias
        tree["norm"]["bias"] = tree["norm"]["bias"] + np.float32(0.1)
    return tree


def test_config_and_frozen_tree_carry_the_family(family):
    name, ref, path, model, frozen = family
    cfg = model.config
    with open(f"{path}/config.json") as f:
        assert json.load(f)["model_type"] == family_config(name).model_type == cfg.model_type
    attn = frozen["layers"]["self_attn"]
    ref_attn = ref.transformer.h[1].attn if name == "gpt2" else ref.model.layers[1].self_attn
    if name.startswith("gemma"):  # four norms per layer, weights as stored (the decoder adds 1)
        for norm in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            stored = getattr(ref.model.layers[1], norm).weight.detach()
            np.testing.assert_array_equal(frozen["layers"][norm]["weight"][1], stored)
        assert cfg.layer_types == ("sliding_attention", "full_attention") and cfg.tie_word_embeddings
        assert cfg.qk_norm == (name == "gemma3") and "lm_head" not in frozen
    elif name == "qwen2":  # biases on q/k/v, read from the file; none on o_proj
        assert cfg.qkv_bias and not cfg.attention_bias and cfg.tie_word_embeddings
        assert "bias" not in attn["o_proj"]
        np.testing.assert_array_equal(attn["k_proj"]["bias"][1], ref_attn.k_proj.bias.detach())
    elif name == "phi3":  # fused projections kept as one tensor each; RoPE tables as transformers'
        assert cfg.fused_qkv and cfg.fused_gate_up and cfg.rotary_dim == 16 and cfg.sliding_window == 8
        assert sorted(attn) == ["o_proj", "qkv_proj"] and sorted(frozen["layers"]["mlp"]) == [
            "down_proj",
            "gate_up_proj",
        ]
        np.testing.assert_array_equal(attn["qkv_proj"]["weight"][1], ref_attn.qkv_proj.weight.detach())
        np.testing.assert_array_equal(
            frozen["layers"]["mlp"]["gate_up_proj"]["weight"][0],
            ref.model.layers[0].mlp.gate_up_proj.weight.detach(),
        )
        for length in (16, 100):  # up to original_max_position_embeddings: short factors; past it: long
            positions = np.arange(length)[None]
            theirs = ref.model.rotary_emb(torch.zeros(1), torch.as_tensor(positions))
            for ours, ref_table in zip(cos_sin(cfg, positions, np.float32), theirs, strict=True):
                assert rel_err(np.asarray(ours), ref_table.numpy()) < 1e-6
    elif name == "gpt2":  # Conv1D (in, out) stored as (out, in); q|k|v fused; LayerNorm biases; wpe
        ref_block = ref.transformer.h[1]
        assert (
            ref_attn is ref_block.attn
            and cfg.fused_qkv
            and cfg.norm_type == "layernorm"
            and cfg.position_embedding == "learned"
        )
        assert sorted(attn) == ["c_attn", "c_proj"] and sorted(frozen["layers"]["mlp"]) == ["c_fc", "c_proj"]
        np.testing.assert_array_equal(attn["c_attn"]["weight"][1], ref_block.attn.c_attn.weight.detach().T)
        np.testing.assert_array_equal(attn["c_attn"]["bias"][1], ref_block.attn.c_attn.bias.detach())
        ln_2 = frozen["layers"]["post_attention_layernorm"]
        np.testing.assert_array_equal(ln_2["bias"][1], ref_block.ln_2.bias.detach())
        np.testing.assert_array_equal(
            frozen["embed_positions"]["weight"], ref.transformer.wpe.weight.detach()
        )
        np.testing.assert_array_equal(frozen["norm"]["bias"], ref.transformer.ln_f.bias.detach())
        assert cfg.tie_word_embeddings and "lm_head" not in frozen
        # openai-community/gpt2's own file was saved from GPT2Model: names without "transformer."
        base_only = save(ref.transformer, f"{path}-base-model")
        _, frozen_base = llama.from_pretrained(base_only, quantization=None, dtype="float32")
        jax.tree.map(np.testing.assert_array_equal, frozen_base, frozen)
    else:  # explicit head_dim 64 (hidden / heads = 32), q/k norms of that size
        assert cfg.qk_norm and cfg.head_dim == 64 and "lm_head" in frozen
        assert all("bias" not in attn[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        np.testing.assert_array_equal(attn["q_norm"]["weight"][1], ref_attn.q_norm.weight.detach())
        assert attn["k_norm"]["weight"].shape == (2, 64)
    assert cfg.num_params == sum(p.numel() for p in ref.parameters())


def test_logits_match_transformers_with_padding_and_packing(family):
    # one forward (one compile): row 0 packs two sequences, row 1 is left-padded (padding as its own
    # segment, masked out, as training batches come); each sequence as transformers computes it alone
    _, ref, _, model, frozen = family
    a, b, c = _tokens(1, 7, seed=1), _tokens(1, 9, seed=2), _tokens(1, 11, seed=3)
    tokens = np.concatenate([np.concatenate([a, b], axis=1), np.pad(c, ((0, 0), (5, 0)))])
    segments = np.array([[1] * 7 + [2] * 9, [0] * 5 + [1] * 11])
    ours = np.asarray(_logits(model, frozen, None, tokens, attention_mask=segments > 0, segment_ids=segments))
    assert rel_err(ours[:1, :7], hf_logits(ref, a)) < TOL
    assert rel_err(ours[:1, 7:], hf_logits(ref, b)) < TOL
    assert rel_err(ours[1:, 5:], hf_logits(ref, c)) < TOL


def test_greedy_generation_matches_transformers(family):
    # Phi-3's rows pass LongRoPE's original length (16) while decoding: transformers then computes
    # the cache again with the long factors, and so do we
    name, ref, _, model, frozen = family
    prompts = [_tokens(1, 5, seed=3)[0].tolist(), _tokens(1, 9, seed=4)[0].tolist()]
    ours = generate(model, frozen, None, prompts, max_new_tokens=20)  # one left-padded batch, KV cache
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=0)
        assert got == out[0, len(prompt) :].tolist()
    if name == "gpt2":  # a position past the learned table stops before any compute
        with pytest.raises(
            ValueError, match=r"9 tokens\) \+ max_new_tokens=56 is past the model's 64 learned"
        ):
            generate(model, frozen, None, prompts, max_new_tokens=56)


def test_peft_loads_our_adapter_and_ours_loads_peft_adapter(family, adapted, tmp_path):
    _, ref, _, model, frozen = family
    tokens = _tokens(2, 10)
    peft_io.save_adapter(str(tmp_path / "ours"), adapted, LORA, model.config)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "ours")).eval()
    ours_logits = np.asarray(_logits(model, frozen, adapted, tokens))
    assert rel_err(ours_logits, hf_logits(theirs, tokens)) < TOL
    assert rel_err(ours_logits, hf_logits(ref, tokens)) > 1e-2  # the adapter (and biases) matter
    # an adapter peft made (random B, same keys as ours) loads into ours with peft's logits
    made = peft.get_peft_model(copy.deepcopy(ref), peft_config(LORA))
    randomize_b(made)
    made.save_pretrained(str(tmp_path / "peft"))
    from safetensors.numpy import load_file

    assert sorted(load_file(str(tmp_path / "peft" / peft_io.WEIGHTS_FILE))) == sorted(
        load_file(str(tmp_path / "ours" / peft_io.WEIGHTS_FILE))
    )
    loaded, cfg = peft_io.load_adapter(str(tmp_path / "peft"), frozen, model.config)
    assert cfg.bias == "all"
    assert rel_err(np.asarray(_logits(model, frozen, loaded, tokens)), hf_logits(made.eval(), tokens)) < TOL


def test_merged_export_loads_in_transformers_with_our_logits(family, adapted, tmp_path):
    name, _, _, model, frozen = family
    hf_export.save_merged(str(tmp_path / "merged"), model.config, frozen, adapted, dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert merged.config.model_type == model.config.model_type
    tokens = _tokens(2, 10)
    ours = np.asarray(_logits(model, frozen, adapted, tokens))
    assert rel_err(ours, hf_logits(merged.eval(), tokens)) < TOL


GGUF_ARCHS = {
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "phi3": "PHI3",
    "gemma2": "GEMMA2",
    "gemma3_text": "GEMMA3",
    "gpt2": "GPT2",
}


def _write_gguf(path: str, ref: transformers.PreTrainedModel, cfg) -> str:
    """ref's float32 weights as llama.cpp's converter writes a Qwen, Phi-3, Gemma or GPT-2 GGUF: its
    metadata keys, gguf's own tensor-name map (not ours), rows in HF order (llama.cpp permutes q/k
    of LLaMA only; Phi-3's fused attn_qkv and ffn_up keep HF's q|k|v and gate|up rows), Gemma's
    norm weights stored as (1 + weight); GPT-2's Conv1D weights transposed to (out, in) and its tied
    head written out as output.weight."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHS[cfg.model_type])
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    if cfg.model_type == "gpt2":
        writer.add_layer_norm_eps(cfg.rms_norm_eps)
    else:
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.model_type == "phi3":  # no head size key; LongRoPE's factors as tensors (Phi3MiniModel)
        rope = cfg.rope_scaling
        writer.add_rope_dimension_count(cfg.rotary_dim)
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings)
        writer.add_rope_scaling_attn_factors(rope.attention_factor)
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope.long_factor, np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope.short_factor, np.float32))
    elif cfg.model_type != "gpt2":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.sandwich_norms:  # the per-layer pattern: 2 layers do not fit llama.cpp's fixed 1-in-6
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in cfg.layer_types])
    if cfg.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if cfg.rope_scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    for name, tensor in ref.state_dict().items():
        if cfg.model_type == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.T.contiguous()
        if cfg.model_type == "gpt2" or not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            values = tensor.numpy() + (1 if cfg.unit_offset_norms and name.endswith("norm.weight") else 0)
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_the_family_loads_the_same_model(family, tmp_path):
    # the GGUF holds the same float32 values: the same config and a bit-equal frozen tree give the
    # logits already shown equal to transformers', with no forward. GGUF carries no token ids here
    # and stores eps and LongRoPE's attention factor as float32 (1e-6 reads back as 9.99999997e-7:
    # 3e-15 in the norm's denominator). Gemma: llama.cpp has no query_pre_attn_scalar (it scales by
    # head_dim below 27B), and its (1 + weight) norms come back within float32 rounding of numbers
    # near 2 (1.2e-7)
    _, ref, _, model, frozen = family
    path = _write_gguf(str(tmp_path / "model.gguf"), ref, model.config)
    from_gguf, frozen_gguf = llama.from_pretrained(path, quantization=None, dtype="float32")
    eps, rope = from_gguf.config.rms_norm_eps, from_gguf.config.rope_scaling
    assert eps == pytest.approx(model.config.rms_norm_eps, rel=1e-7)
    assert rope.attention_factor == pytest.approx(model.config.rope_scaling.attention_factor, rel=1e-7)
    rope = dataclasses.replace(model.config.rope_scaling, attention_factor=rope.attention_factor)
    want = model.config.replace(bos_token_id=None, eos_token_ids=(), rms_norm_eps=eps, rope_scaling=rope)
    if want.sandwich_norms:
        want = want.replace(query_pre_attn_scalar=want.head_dim)
    assert from_gguf.config == want
    paths = jax.tree_util.tree_flatten_with_path(frozen)[0]
    for (path_, ours), theirs in zip(paths, jax.tree.leaves(frozen_gguf), strict=True):
        is_norm = "norm" in jax.tree_util.keystr(path_)
        np.testing.assert_allclose(
            theirs, ours, rtol=0, atol=1.2e-7 if want.unit_offset_norms and is_norm else 0
        )


def test_sharded_forward_equals_one_device(family, adapted):
    # tensor x fsdp split of weight rows (the q/k norms replicated): only the order of float32
    # sums changes, so logits agree to float32 rounding (1e-5)
    name, _, _, model, frozen = family
    if name == "gemma2":
        pytest.skip("Gemma 2's tree is Gemma 3's less the q/k norms: one Gemma's compile is enough")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    tokens = _tokens(2, 10)
    want = np.asarray(_logits(model, frozen, adapted, tokens))
    frozen_sh = jax.device_put(frozen, sharding.frozen_shardings(mesh, frozen))
    lora_sh = jax.device_put(adapted, sharding.lora_shardings(mesh, adapted))
    got = jax.jit(lambda fr, lo, t: model.apply(fr, lo, t))(frozen_sh, lora_sh, tokens)
    assert rel_err(np.asarray(got), want) < 1e-5


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen3-8b", "phi-3-mini", "gemma-3-12b", "gpt2"])
def test_random_init_builds_the_preset_family_at_full_size(name):
    # traced, not run (jax.eval_shape): the real 7B/8B/124M tree and forward, no memory and no compile
    model = llama.Llama(preset(name, dtype="bfloat16"))
    frozen = jax.eval_shape(lambda: llama.random_init(name, quantization="nf4", dtype="bfloat16")[1])
    cfg, attn = model.config, frozen["layers"]["self_attn"]
    if name == "phi-3-mini":  # fused q|k|v and gate|up rows, each one NF4 tensor
        qkv, gate_up = attn["qkv_proj"]["weight"], frozen["layers"]["mlp"]["gate_up_proj"]["weight"]
        assert isinstance(qkv, nf4.NF4Tensor) and qkv.shape == (3 * 3072, 3072) and "q_proj" not in attn
        assert isinstance(gate_up, nf4.NF4Tensor) and gate_up.shape == (2 * 8192, 3072)
    elif name == "gpt2":  # q|k|v fused in c_attn; LayerNorm biases; the position table; tied head
        assert isinstance(attn["c_attn"]["weight"], nf4.NF4Tensor) and attn["c_attn"]["weight"].shape == (
            2304,
            768,
        )
        assert attn["c_attn"]["bias"].shape == (12, 2304) and frozen["layers"]["mlp"]["c_fc"][
            "bias"
        ].shape == (12, 3072)
        assert frozen["embed_positions"]["weight"].shape == (1024, 768) and frozen["norm"]["bias"].shape == (
            768,
        )
        assert "lm_head" not in frozen and cfg.num_params == 124_439_808  # GPT2LMHeadModel's count
    else:
        q = attn["q_proj"]["weight"]
        assert isinstance(q, nf4.NF4Tensor) and q.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    if name == "qwen2.5-7b":
        assert attn["v_proj"]["bias"].shape == (28, 512) and "bias" not in attn["o_proj"]
    elif name == "gemma-3-12b":  # head_dim 256 (hidden / heads: 240), four norms a layer
        norm = frozen["layers"]["post_feedforward_layernorm"]["weight"]
        assert norm.shape == (48, 3840) and attn["q_norm"]["weight"].shape == (48, 256)
    elif name == "qwen3-8b":
        assert attn["q_norm"]["weight"].shape == (36, 128) and "bias" not in attn["q_proj"]
    logits = jax.eval_shape(lambda fr: model.apply(fr, None, np.zeros((1, 8), np.int32)), frozen)
    assert logits.shape == (1, 8, cfg.vocab_size)


def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(family, adapted, tmp_path):
    # Gemma3ForConditionalGeneration saves the text decoder under language_model.model.*, beside a
    # vision tower; its text_config lists the decoder. Loaded, it is the gemma3_text model itself;
    # our adapter of it loads in peft on the multimodal model (keys under model.language_model.,
    # no LoRA on the vision tower) with our logits, and back into ours unchanged
    name, ref, _, model, frozen = family
    if name != "gemma3":
        pytest.skip("the multimodal checkpoint is Gemma 3's")
    text = ref.config.to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28
    )
    config = transformers.Gemma3Config(text_config=text, vision_config=vision | {"patch_size": 14})
    multimodal = transformers.Gemma3ForConditionalGeneration(config)
    multimodal.model.language_model.load_state_dict(ref.model.state_dict())
    path = save(multimodal, tmp_path / "multimodal")
    loaded, loaded_frozen = llama.from_pretrained(path, quantization=None, dtype="float32")
    assert loaded.config == model.config.replace(text_of_multimodal=True)
    jax.tree.map(np.testing.assert_array_equal, loaded_frozen, frozen)
    peft_io.save_adapter(str(tmp_path / "adapter"), adapted, LORA, loaded.config)
    theirs = peft.PeftModel.from_pretrained(multimodal.eval(), str(tmp_path / "adapter")).eval()
    assert not any("vision" in n and "lora_A" in n for n, _ in theirs.named_modules())
    tokens = _tokens(2, 10)
    assert rel_err(np.asarray(_logits(model, frozen, adapted, tokens)), hf_logits(theirs, tokens)) < TOL
    back, _ = peft_io.load_adapter(str(tmp_path / "adapter"), loaded_frozen, loaded.config)
    jax.tree.map(np.testing.assert_array_equal, back, adapted)
