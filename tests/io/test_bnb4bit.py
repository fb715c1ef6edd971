"""bitsandbytes 4-bit HF checkpoints in and out: transformers + bitsandbytes (on CPU) write the
reference checkpoints; loading takes their bytes as stored, writing gives the same bytes back."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from qlora_jax.io import hf_export
from qlora_jax.models import llama
from qlora_jax.models.frozen import Quantization, linear_shapes
from tests.conftest import run_cli, tiny_run_overrides, train_command
from tests.models.hf_reference import family_config, hf_logits, hf_model, rel_err, save, small_config


def _bnb_4bit(source: str, target: str, quant_type: str = "nf4", double_quant: bool = True) -> str:
    """transformers' own bnb-4bit checkpoint (float32 compute) of the HF directory `source`."""
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization, device_map="cpu"
    )
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(16-bit directory, its bnb-4bit directory) of a small random LLaMA with an untied head."""
    root = tmp_path_factory.mktemp("bnb")
    dense = save(hf_model(small_config()), root / "dense")
    return dense, _bnb_4bit(dense, str(root / "bnb4bit"))


def _tensors(directory: str) -> dict[str, np.ndarray]:
    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _load_4bit(directory: str):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu").eval()


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12))
# one compiled forward per model: eager apply dispatches (and compiles) op by op, slower
_forward = jax.jit(lambda model, frozen, lora, tokens: model.apply(frozen, lora, tokens), static_argnums=0)


def test_loading_takes_every_byte_as_stored_and_matches_transformers_4bit_logits(checkpoints):
    """Both sides decode the same 4-bit codes and scales to the same float32 weights, so the
    float32 logits differ only by summation order: rel 1e-4, as for 16-bit LLaMA checkpoints."""
    _, bnb_dir = checkpoints
    model, frozen = llama.from_pretrained(bnb_dir, quantization="nf4", dtype="float32")
    stored = _tensors(bnb_dir)
    for i in range(2):
        for group, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
            ours = frozen["layers"][group][name]["weight"]
            key = f"model.layers.{i}.{group}.{name}.weight"
            assert np.array_equal(np.asarray(ours.packed[i]), stored[key].reshape(-1))
            assert np.array_equal(np.asarray(ours.absmax[i]), stored[f"{key}.absmax"])
            assert np.array_equal(np.asarray(ours.nested_absmax[i]), stored[f"{key}.nested_absmax"])
    assert np.array_equal(np.asarray(frozen["lm_head"]["weight"]), stored["lm_head.weight"])  # kept 16-bit
    ours = np.asarray(_forward(model, frozen, None, jnp.asarray(TOKENS)))
    assert rel_err(ours, hf_logits(_load_4bit(bnb_dir), TOKENS)) < 1e-4


def test_writing_what_was_loaded_gives_the_input_tensors_byte_for_byte(checkpoints, tmp_path):
    _, bnb_dir = checkpoints
    model, frozen = llama.from_pretrained(bnb_dir, quantization="nf4", dtype="float32")
    hf_export.save_bnb4bit(str(tmp_path / "out"), model.config, frozen, dtype="float32")
    before, after = _tensors(bnb_dir), _tensors(str(tmp_path / "out"))
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].tobytes() == tensor.tobytes(), name


def test_our_quantization_written_as_bnb4bit_dequantizes_in_bitsandbytes_to_our_weights(
    checkpoints, tmp_path
):
    """bitsandbytes dequantizes in the stored dtype (bfloat16 here): compared there, bit for bit."""
    import bitsandbytes

    dense_dir, _ = checkpoints
    model, frozen = llama.from_pretrained(dense_dir, quantization="nf4", dtype="bfloat16")
    hf_export.save_bnb4bit(str(tmp_path / "ours"), model.config, frozen, dtype="bfloat16")
    loaded = _load_4bit(str(tmp_path / "ours"))
    for group, name in (("self_attn", "k_proj"), ("mlp", "gate_proj")):
        module = getattr(getattr(loaded.model.layers[1], group), name)
        theirs = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        ours = frozen["layers"][group][name]["weight"].dequantize(jnp.bfloat16)[1]
        assert np.array_equal(theirs.float().numpy(), np.asarray(ours.astype(jnp.float32)))


@pytest.mark.parametrize(
    "family, quant_type, double_quant",
    [
        ("qwen2", "nf4", True),
        ("qwen3", "fp4", False),
        ("phi3", "nf4", True),
        ("gemma3", "nf4", False),
        ("gpt2", "nf4", True),
    ],
)
def test_other_families_and_formats_load_and_write_back_their_bnb4bit_checkpoints(
    family, quant_type, double_quant, tmp_path
):
    """Qwen2's q/k/v biases, Qwen3's q/k norms and Gemma 3's four norms a layer and q/k norms (Gemma
    2's tensors are the same less the q/k norms) stay 16-bit beside the 4-bit linears, Phi-3's fused
    qkv_proj / gate_up_proj are one 4-bit tensor each, FP4 and single quantization as well as NF4 +
    double quantization; GPT-2's Conv1D weights are stored as transformers quantized them, transposed
    to (out, in), and its LayerNorms, biases and position table stay 16-bit: logits as transformers'
    4-bit model (rel 1e-4, float32 over the same weights) and every tensor written back byte for
    byte. Our own quantization of GPT-2's 16-bit checkpoint (Conv1D weights transposed first) gives
    transformers' 4-bit codes (its double-quantized scales on CPU come from bitsandbytes' approximate
    native search, tests/quant/bnb_reference.py, so they are not compared)."""
    dense = save(hf_model(family_config(family)), tmp_path / "dense")
    bnb_dir = _bnb_4bit(dense, str(tmp_path / "bnb4bit"), quant_type, double_quant)
    model, frozen = llama.from_pretrained(bnb_dir, quantization=quant_type, dtype="float32")
    ours = np.asarray(_forward(model, frozen, None, jnp.asarray(TOKENS)))
    assert rel_err(ours, hf_logits(_load_4bit(bnb_dir), TOKENS)) < 1e-4
    if family == "gpt2":  # the Conv1D orientation is ours to get right when we quantize
        quant = Quantization(quant_type, 64, double_quant)
        _, quantized = llama.from_pretrained(dense, quantization=quant, dtype="float32")
        for group, name in linear_shapes(model.config):
            theirs, mine = frozen["layers"][group][name]["weight"], quantized["layers"][group][name]["weight"]
            np.testing.assert_array_equal(np.asarray(mine.packed), np.asarray(theirs.packed))
    hf_export.save_bnb4bit(str(tmp_path / "out"), model.config, frozen, dtype="float32")
    before, after = _tensors(bnb_dir), _tensors(str(tmp_path / "out"))
    assert sorted(after) == sorted(before)
    assert all(after[name].tobytes() == tensor.tobytes() for name, tensor in before.items())


def _broken(bnb_dir: str, target, change) -> str:
    """A copy of the bnb-4bit directory with `change(tensors, config)` applied."""
    shutil.copytree(bnb_dir, target)
    tensors = _tensors(str(target))
    with open(target / "config.json") as f:
        config = json.load(f)
    change(tensors, config)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    with open(target / "config.json", "w") as f:
        json.dump(config, f)
    return str(target)


STATE = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def _drop_quant_state(tensors, config):
    del tensors[STATE]


def _blocksize_48(tensors, config):
    scalars = json.loads(bytes(tensors[STATE]).decode()) | {"blocksize": 48}
    tensors[STATE] = np.frombuffer(json.dumps(scalars).encode(), np.uint8).copy()


def _eight_bit(tensors, config):
    config["quantization_config"] |= {"load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True}


@pytest.mark.parametrize(
    "change, expected",
    [
        (_eight_bit, "model.layers.0.self_attn.q_proj.weight is an 8-bit (LLM.int8, load_in_8bit) weight"),
        (_drop_quant_state, "model.layers.0.self_attn.q_proj.weight has 4-bit companions but no quant_state"),
        (_blocksize_48, "model.layers.0.self_attn.q_proj.weight has blocksize 48; supported: (32, 64"),
    ],
)
def test_bad_bnb4bit_checkpoints_stop_with_one_line_naming_file_and_tensor(
    checkpoints, tmp_path, change, expected
):
    _, bnb_dir = checkpoints
    broken = _broken(bnb_dir, tmp_path / "broken", change)
    with pytest.raises(ValueError) as err:
        llama.from_pretrained(broken)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(os.path.join(broken, "model.safetensors")) and expected in message


def test_a_cli_run_from_a_bnb4bit_checkpoint_trains_and_its_adapter_loads_in_peft(tiny_model, tmp_path):
    """QLoRA from transformers' 4-bit checkpoint of the tiny model; peft puts our adapter on
    transformers' 4-bit model of that checkpoint. float32 compute on both sides over the same
    4-bit weights: rel 1e-4."""
    import peft

    bnb_dir = _bnb_4bit(tiny_model, str(tmp_path / "bnb4bit"))
    for file in os.listdir(tiny_model):
        if file.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tiny_model, file), bnb_dir)
    run_dir = tmp_path / "run"
    # 6 steps, tiny_run's: the schedule's length is compiled into the step, and the bnb-4bit base
    # has the tiny model's shapes and NF4 layout, so the session's cached compile of tiny_run's step
    # serves (a 3-step run compiled its own: ~7 s of CPU)
    out = run_cli(train_command(*tiny_run_overrides(bnb_dir, run_dir, 6), "--config.model.dtype=float32"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    model, frozen = llama.from_pretrained(bnb_dir, quantization="nf4", dtype="float32")
    from qlora_jax.io import peft as peft_io

    lora, _ = peft_io.load_adapter(str(run_dir / "adapter"), frozen, model.config)
    tokens = np.random.default_rng(1).integers(0, 49152, (1, 10))
    ours = np.asarray(_forward(model, frozen, lora, jnp.asarray(tokens)))
    theirs = peft.PeftModel.from_pretrained(_load_4bit(bnb_dir), str(run_dir / "adapter")).eval()
    assert rel_err(ours, hf_logits(theirs, tokens)) < 1e-4
