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


def _whole_tree_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The same recipe as one optax chain over the whole tree (the form before the per-leaf state)."""
    decay = lambda t: jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in ("a", "b"), t)  # noqa: E731
    adamw = optax.adamw(
        learning_rate(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay
    )
    labels = lambda t: jax.tree.map(lambda m: "train" if m else "fixed", lora_lib.trainable_mask(t))  # noqa: E731
    train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return optax.multi_transform({"train": train, "fixed": optax.set_to_zero()}, labels)


def test_the_per_leaf_state_updates_as_one_chain_over_the_whole_tree():
    """One AdamW state per leaf changes nothing: the clipping still sees the global norm of the
    trainable leaves (the gradients here are large, so it clips every step; the fixed scales'
    gradients, also large, stay out of it), AdamW is elementwise. The norm is summed in
    another order, so equal to float32 rounding: rtol 1e-6 (observed: one element 1 ulp apart).
    With the scales' gradients in the norm they differ by up to 4e-5."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.3, warmup_steps=2, schedule="linear")
    rng = np.random.default_rng(0)
    tree = {"layers": {"q": {"a": rng.normal(size=(2, 4, 8)), "b": np.zeros((2, 8, 4)), "scale": np.ones(2)}}}
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    params = {}
    for name, optimizer in {
        "per_leaf": make_optimizer(cfg),
        "whole_tree": _whole_tree_optimizer(cfg),
    }.items():
        lora, state = tree, optimizer.init(tree)
        for step in range(4):
            noise = np.random.default_rng(step)
            grads = jax.tree.map(lambda x, noise=noise: np.float32(10.0 * noise.normal(size=x.shape)), lora)
            updates, state = optimizer.update(grads, state, lora)
            lora = optax.apply_updates(lora, updates)
        params[name] = lora
    for a, b in zip(jax.tree.leaves(params["per_leaf"]), jax.tree.leaves(params["whole_tree"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert not np.allclose(params["per_leaf"]["layers"]["q"]["b"], 0)  # it trained


def test_an_offloaded_state_visits_the_device_one_leaf_after_another():
    """With fetch and stash, leaf i's moments are fetched from a barrier that also waits for
    the stash (the copy back to host) of leaf i - 2: at most two leaves' moments are on the
    device at once, not the whole state (1.5 GiB for Llama-2-70B at r=16). Leaves of distinct
    sizes tell them apart in the traced program."""
    sizes = (3, 5, 7, 11)
    tree = {"layers": {f"p{i}": {"a": np.ones((n,), np.float32)} for i, n in enumerate(sizes)}}
    optimizer = make_optimizer(OptimConfig())
    state = optimizer.init(tree)
    device = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), device)
    fetch = lambda i, s: jax.device_put(s, device[i])  # noqa: E731
    stash = lambda i, new, old: jax.device_put(new, host[i])  # noqa: E731
    jaxpr = jax.make_jaxpr(lambda g, s, p: optimizer.update(g, s, p, fetch=fetch, stash=stash))(
        tree, state, tree
    ).jaxpr
    to_host = {
        v: v.aval.shape
        for e in jaxpr.eqns
        if e.primitive.name == "device_put"
        and any(d.memory_kind == "pinned_host" for d in e.params["devices"])
        for v in e.outvars
    }
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == len(sizes)
    for i, barrier in enumerate(barriers):
        waits_for = {to_host[v] for v in barrier.invars if to_host.get(v)}  # moments, not the counts
        assert waits_for == (set() if i < 2 else {(sizes[i - 2],)}), (i, waits_for)
