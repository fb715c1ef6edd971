"""Sharded training on 8 CPU devices (tests/conftest.py forces them): every mesh layout trains
the same as one device, and fsdp divides the frozen base's bytes per device. The same through
the CLI, on a mesh and in two processes: tests/test_sharding_cli.py."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

from qlora_jax import lora as lora_lib
from qlora_jax import sharding
from qlora_jax.models import llama
from qlora_jax.quant.nf4 import dequantize
from qlora_jax.train import step as step_lib
from qlora_jax.train.optim import OptimConfig, make_optimizer
from tests.models.hf_reference import small_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")

# every projection's element count is a multiple of 8 x 64 x 256, so even double-quantized
# weights split 8 ways at whole rows and whole scale blocks
MODEL = small_config(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=4)
LORA = lora_lib.LoraConfig(r=8, alpha=16, target_modules="all-linear")
STEPS = 3
LR = 1e-3


@functools.cache
def _setup():
    """(model, frozen, lora), built once; lora in host memory, so each run's device copy is its
    own (the step donates it)."""
    model, frozen = llama.random_init(MODEL, quantization="nf4", dtype="float32")
    lora = lora_lib.init_lora(jax.random.key(0), frozen, MODEL, LORA)
    # non-zero B so the first step's loss already depends on every adapter
    lora = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.01 if p[-1].key == "b" else x, lora)
    return model, frozen, jax.device_get(lora)


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, MODEL.vocab_size, (8, 32)).astype(np.int32)
        out.append({"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": rng.random((8, 32)) > 0.1})
    return out


def _build(mesh_cfg: sharding.MeshConfig | None, offload: bool = False):
    """(train_step, lora, optimizer state, frozen, mesh) on one device (None) or a mesh."""
    model, frozen, lora = _setup()
    optim_cfg = OptimConfig(lr=LR, max_grad_norm=1.0, offload_state=offload)
    optimizer = make_optimizer(optim_cfg)
    abstract_state = jax.eval_shape(optimizer.init, lora)
    if mesh_cfg is None:
        mesh = None
        lora_sh, state_sh = None, sharding.default_shardings(abstract_state)
        lora = jax.device_put(lora, sharding.default_shardings(lora))  # committed, as the step's outputs
    else:
        mesh = sharding.make_mesh(mesh_cfg)
        frozen = jax.device_put(frozen, sharding.frozen_shardings(mesh, frozen))
        lora_sh = sharding.lora_shardings(mesh, lora)
        lora = jax.device_put(lora, lora_sh)
        state_sh = sharding.opt_state_shardings(mesh, abstract_state)
    state = step_lib.init_opt_state(optimizer, lora, optim_cfg, state_sh)
    train_step = step_lib.make_train_step(model, LORA, optim_cfg, optimizer, state_sh, 1024, lora_sh)
    return train_step, lora, state, frozen, mesh


def _train(mesh_cfg: sharding.MeshConfig | None, offload: bool = False):
    """Per-step losses and the final LoRA tree, on one device (None) or a mesh."""
    train_step, lora, state, frozen, mesh = _build(mesh_cfg, offload)
    losses = []
    for batch in _batches():
        if mesh is not None:
            batch = sharding.shard_batch(mesh, batch)
        lora, state, metrics = train_step(lora, state, frozen, batch, None)
        losses.append(float(metrics["loss"]))
    return np.array(losses), lora, state, frozen


@pytest.fixture(scope="module")
def single_device():
    losses, lora, _, _ = _train(None)
    return losses, jax.device_get(lora)


LAYOUTS = {
    "data": sharding.MeshConfig(data=8),
    "fsdp": sharding.MeshConfig(data=1, fsdp=8),
    "tensor": sharding.MeshConfig(data=1, tensor=8),
    "data2_fsdp2_tensor2": sharding.MeshConfig(data=2, fsdp=2, tensor=2),
}


def _assert_trains_like_one_device(single_device, losses, lora):
    # float32 throughout; only the order of the cross-device sums differs from one device, so the
    # losses agree to float32 rounding (rtol 1e-5). AdamW divides by sqrt(v): a gradient entry
    # near zero can turn a rounding difference into a visible share of its update, so the adapters
    # are held to 1% of the largest move AdamW can make in these steps (lr x steps)
    want_losses, want_lora = single_device
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.device_get(lora)), jax.tree.leaves(want_lora), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * LR * STEPS)


# the data layout trains in the offloaded-state test below (one compile fewer)
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "data"])
def test_mesh_layouts_train_like_one_device(single_device, layout):
    losses, lora, _, _ = _train(LAYOUTS[layout])
    _assert_trains_like_one_device(single_device, losses, lora)


def test_offloaded_state_is_split_over_the_data_axis_in_pinned_host(single_device):
    """ZeRO-1: under pure data parallelism (adapters replicated) each device keeps 1/8 of every
    AdamW moment, in pinned host memory, and training is as on one device (the data layout's
    check: the other layouts are parametrized above)."""
    losses, lora, state, _ = _train(LAYOUTS["data"], offload=True)
    _assert_trains_like_one_device(single_device, losses, lora)
    moments = [x for x in jax.tree.leaves(state) if x.ndim == 3]
    assert moments and all(x.sharding.memory_kind == "pinned_host" for x in moments)
    assert all(x.addressable_shards[0].data.size * 8 == x.size for x in moments)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(lora))


@pytest.mark.parametrize("layout", ["data", "fsdp"])
def test_batch_ranks_gradients_are_summed_once_after_the_backward_pass(layout):
    """The ranks the batch is split over (data, and fsdp too: it splits the rows) add their
    adapter gradients (and loss sums) in one reduction after the backward pass, as DDP's buckets
    do. Left to GSPMD, the sums land inside the scanned layers' and loss chunks' loops: one
    all-reduce per layer and chunk, each a synchronization point of all GPUs."""
    train_step, lora, state, frozen, mesh = _build(LAYOUTS[layout])
    batch = sharding.shard_batch(mesh, _batches()[0])
    hlo = train_step.lower(lora, state, frozen, batch, None).compile().as_text()
    assert "while(" in hlo and "all-reduce" in hlo
    assert not [line for line in _loop_collectives(hlo) if "all-reduce" in line]


def _loop_collectives(hlo: str) -> list[str]:
    """The collective instructions inside the compiled program's loop bodies."""
    return _collectives(hlo, set(re.findall(r"\bwhile\(.*?body=%?([\w.-]+)", hlo)))


def _collectives(hlo: str, names: set[str] | None = None) -> list[str]:
    """The collective instructions of the named computations (None: all of them)."""
    computations = dict(re.findall(r"^(?:ENTRY )?%?([\w.-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S))
    collective = re.compile(r"= .*\b(all-gather|reduce-scatter|all-reduce|all-to-all)(-start)?\(")
    return [
        line
        for name, body in computations.items()
        if names is None or name in names
        for line in body.splitlines()
        if collective.search(line)
    ]


def test_fsdp_gathers_each_layers_4bit_weights_not_the_activations():
    """Under fsdp each device multiplies its own rows of the batch by the whole weight, gathered
    as NF4 codes and scales (uint8) inside the layer loop, one layer at a time, and looks up and
    scores its own rows against the whole embedding and head. Left to GSPMD, the weights stay
    split and the (tokens, features) activations of the global batch move instead: per
    projection, for the embedding lookup, and per loss chunk."""
    train_step, lora, state, frozen, mesh = _build(LAYOUTS["fsdp"])
    batch = sharding.shard_batch(mesh, _batches()[0])
    hlo = train_step.lower(lora, state, frozen, batch, None).compile().as_text()
    in_loops = _loop_collectives(hlo)
    gathered = [line for line in in_loops if re.search(r"= u8\[1,\d+\]\S* all-gather", line)]
    assert len(gathered) >= 7, in_loops  # every projection's codes, one layer's slice ([1, n]) each
    seq = _batches()[0]["inputs"].shape[1]
    tokens_by_features = re.compile(rf"\[(\d+,{seq}|\d+),(512|1024)\]")
    tokens = {n * seq for n in range(1, 9)}  # a collective of (tokens, features), rows flattened or not
    moved = [
        line
        for line in _collectives(hlo)
        if (m := tokens_by_features.search(line)) and ("," in m.group(1) or int(m.group(1)) in tokens)
    ]
    assert not moved, moved


def test_fsdp_divides_the_frozen_bytes_per_device():
    _, frozen, _ = _setup()
    total = sum(x.nbytes for x in jax.tree.leaves(frozen))
    mesh = sharding.make_mesh(LAYOUTS["fsdp"])
    sharded = jax.device_put(frozen, sharding.frozen_shardings(mesh, frozen))
    norms = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(frozen) if "norm" in str(path))
    per_device = sharding.per_device_bytes(sharded)
    # everything but the norm weights (and NF4's one offset per layer) is split 8 ways
    assert total / 8 <= per_device <= total / 8 + norms + 64, (per_device, total)


def test_random_init_and_loading_go_straight_to_each_devices_share(tmp_path):
    """Built or loaded with a mesh, the base is the same bytes as on one device, already split:
    each device's buffers hold its share (the building program's own per-device output too)."""
    from tests.models.hf_reference import hf_model, save

    mesh = sharding.make_mesh(LAYOUTS["fsdp"])
    path = save(hf_model(MODEL), tmp_path / "hf")
    for load in (
        lambda mesh: llama.random_init(MODEL, quantization="nf4", dtype="float32", mesh=mesh)[1],
        lambda mesh: llama.from_pretrained(path, quantization="nf4", dtype="float32", mesh=mesh)[1],
    ):
        whole, split = load(None), load(mesh)
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        shardings = jax.tree.leaves(sharding.frozen_shardings(mesh, whole))
        assert all(x.sharding == want for x, want in zip(jax.tree.leaves(split), shardings, strict=True))
        total = sum(x.nbytes for x in jax.tree.leaves(whole))
        assert sharding.per_device_bytes(split) < total / 4


def test_nf4_shards_dequantize_their_own_rows():
    _, frozen, _ = _setup()
    weight = frozen["layers"]["mlp"]["gate_proj"]["weight"]
    mesh = sharding.make_mesh(LAYOUTS["fsdp"])
    sharded = jax.device_put(
        weight,
        sharding.frozen_shardings(mesh, {"layers": {"x_proj": {"weight": weight}}})["layers"]["x_proj"][
            "weight"
        ],
    )
    full = np.asarray(dequantize(weight))  # (layers, out, in)
    rows = MODEL.intermediate_size // 8
    for k, device in enumerate(mesh.devices.flat):
        local = {
            name: getattr(sharded, name).addressable_shards[k].data
            for name in ("packed", "absmax", "nested_absmax", "offset")
        }
        assert all(getattr(sharded, n).addressable_shards[k].device == device for n in local)
        # each device's bytes, dequantized alone (on the default device: eager ops on device k
        # would compile again for each of the 8 CPU devices, the same computation, ~1 s each)
        local = {name: np.asarray(data) for name, data in local.items()}
        shard = dataclasses.replace(weight, **local, shape=(rows, MODEL.hidden_size))
        np.testing.assert_array_equal(np.asarray(dequantize(shard)), full[:, k * rows : (k + 1) * rows])


def test_mesh_config_resolves_the_rest_and_names_bad_sizes():
    assert sharding.MeshConfig(data=-1, fsdp=2).resolve(8) == (4, 2, 1)
    assert sharding.MeshConfig(data=2, fsdp=2, tensor=-1).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="mesh.fsdp=0"):
        sharding.MeshConfig(fsdp=0).resolve(8)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.MeshConfig(data=-1, fsdp=3).resolve(8)
    with pytest.raises(ValueError, match="more than one mesh axis is -1"):
        sharding.MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="uses 4 devices, there are 8"):
        sharding.MeshConfig(data=2, fsdp=2).resolve(8)


def test_batch_rows_must_split_over_data_and_fsdp():
    mesh = sharding.make_mesh(LAYOUTS["data2_fsdp2_tensor2"])
    with pytest.raises(ValueError, match="train.batch_size=6 does not split over mesh data x fsdp = 4"):
        sharding.shard_batch(mesh, {"inputs": np.zeros((6, 4), np.int32)})


def test_packed_rows_keep_the_segment_mask_on_several_devices():
    """cuDNN's packed attention runs on one device only (sharding.single_device_layout): on a
    mesh of several the batch goes without its segment_starts, on one it keeps them."""
    batch = {"inputs": np.zeros((8, 4), np.int32), "segment_starts": np.zeros((8, 3), np.int32)}
    several = sharding.make_mesh(LAYOUTS["data2_fsdp2_tensor2"])
    one = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    assert set(sharding.shard_batch(several, batch)) == {"inputs"}
    assert set(sharding.shard_batch(one, batch)) == {"inputs", "segment_starts"}
