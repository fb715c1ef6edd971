"""Schedules against transformers' get_*_schedule_with_warmup; the decay mask and fixed scales."""

import jax
import numpy as np
import optax
import pytest
import torch
import transformers

from qlora_jax import lora as lora_lib
from qlora_jax.models import llama
from qlora_jax.train.optim import OptimConfig, learning_rate, make_optimizer
from tests.models.hf_reference import small_config

HF_SCHEDULES = {
    "constant": lambda opt, w, t: transformers.get_constant_schedule_with_warmup(opt, w),
    "linear": transformers.get_linear_schedule_with_warmup,
    "cosine": transformers.get_cosine_schedule_with_warmup,
}


@pytest.mark.parametrize("schedule", list(HF_SCHEDULES))
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedules_equal_transformers(schedule, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = HF_SCHEDULES[schedule](opt, warmup, 40)
    expected = []
    for _ in range(45):
        expected.append(opt.param_groups[0]["lr"])  # the lr the next optimizer.step() uses
        opt.step()
        sched.step()
    fn = learning_rate(OptimConfig(lr=3e-4, schedule=schedule, warmup_steps=warmup, total_steps=40))
    # float32 vs Python floats: 1e-5 relative; up to total_steps (HF's cosine rises again after it)
    np.testing.assert_allclose([float(fn(i)) for i in range(41)], expected[:41], rtol=1e-5, atol=1e-12)
    assert float(fn(44)) == pytest.approx(3e-4 if schedule == "constant" else 0.0)


def test_scales_never_move_and_biases_skip_weight_decay():
    model_cfg = small_config(attention_bias=True)
    _, frozen = llama.random_init(model_cfg, quantization=None, dtype="float32")
    tree = lora_lib.init_lora(
        jax.random.key(0),
        frozen,
        model_cfg,
        lora_lib.LoraConfig(target_modules=("q_proj",), bias="lora_only"),
    )
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, max_grad_norm=None))
    zero_grads = jax.tree.map(np.zeros_like, tree)
    updates, _ = opt.update(zero_grads, opt.init(tree), tree)
    q = updates["layers"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(q["scale"], 0)  # fixed
    np.testing.assert_array_equal(q["bias"], 0)  # no decay on biases (zero grad -> zero update)
    np.testing.assert_allclose(
        q["a"], -0.1 * 0.5 * np.asarray(tree["layers"]["self_attn"]["q_proj"]["a"]), rtol=1e-6
    )  # decoupled decay on A
    assert optax.tree_utils.tree_l2_norm(updates) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="exp"), "schedule 'exp'"),
        (dict(accumulation_steps=0), "accumulation_steps"),
        # warmup as long as the run is allowed (the run config clamps longer warmups to it)
        (dict(schedule="cosine", warmup_steps=11, total_steps=10), "total_steps=10"),
    ],
)
def test_bad_optimizer_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)
