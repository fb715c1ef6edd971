"""The train step: accumulation equals one large batch, host-offloaded state equals on-device state,
the frozen tree gets no gradient, and backward keeps no dequantized weight."""

from __future__ import annotations

import contextlib
import functools
import io
import re

import jax
import jax.ad_checkpoint
import numpy as np
import pytest

from qlora_jax import lora as lora_lib
from qlora_jax import sharding
from qlora_jax.models import decoder, linear, llama
from qlora_jax.models import frozen as frozen_lib
from qlora_jax.train import step as step_lib
from qlora_jax.train.embedding_lookup import HostEmbeddingLookup
from qlora_jax.train.optim import OptimConfig, make_optimizer
from tests.models.hf_reference import small_config

LORA = lora_lib.LoraConfig(r=4, alpha=8, target_modules="all-linear")


@functools.cache
def _setup(quantization="nf4", **model_changes):
    """(model, frozen, tree), built once per configuration: no test changes or donates them."""
    model_cfg = small_config(**model_changes)
    model, frozen = llama.random_init(model_cfg, quantization=quantization, dtype="float32")
    tree = lora_lib.init_lora(jax.random.key(0), frozen, model_cfg, LORA)
    tree = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.02 if p[-1].key == "b" else x, tree)
    return model, frozen, tree


def _batch(rng, shape):
    ids = rng.integers(0, 256, shape).astype(np.int32)
    return {"inputs": ids, "targets": np.roll(ids, -1, -1), "loss_mask": rng.random(shape) > 0.2}


@functools.cache
def _compiled_loss_and_grads(config, accumulation_steps):
    """step_lib.mean_loss_and_grads compiled as the step compiles it (eager dispatch is 2x slower),
    one jitted function per model config, so tests on the same config and shapes share a compile."""
    model = llama.Llama(config)

    def loss_and_grads(lora, frozen, batch):
        return step_lib.mean_loss_and_grads(model, LORA, lora, frozen, batch, None, accumulation_steps, 1024)

    return jax.jit(loss_and_grads)


def _loss_and_grads(model, tree, frozen, batch, accumulation_steps=1):
    return _compiled_loss_and_grads(model.config, accumulation_steps)(tree, frozen, batch)


def test_accumulated_micro_batches_equal_one_large_batch():
    # full remat and (4, 16): the one large batch is the next test's reference compile, shared
    model, frozen, tree = _setup(remat_policy="full")
    big = _batch(np.random.default_rng(0), (4, 16))
    micro = jax.tree.map(lambda x: x.reshape(2, 2, 16), big)
    loss1, n1, g1 = _loss_and_grads(model, tree, frozen, big)
    loss2, n2, g2 = _loss_and_grads(model, tree, frozen, micro, accumulation_steps=2)
    assert n1 == n2
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)


def test_sequence_tiles_and_offload_policies_give_the_same_loss_and_grads():
    """The MLP over tiles of 3 of 16 tokens (the last tile zero-padded), and layer inputs or
    every matmul operand and attention residual (offload_all; offload_attention keeps a subset)
    kept in host memory instead of recomputed, change where activations live, not the math. The
    tiles' adapter gradients add up in another order, and a kept value can differ from its
    recomputation in fusion: float32 rounding of sums of ~1e-2 terms, so rtol 1e-5 with atol
    1e-7 (largest difference observed 1.7e-8 on these 4 rows, 2.3e-8 on 2)."""
    model, frozen, tree = _setup(remat_policy="full")
    batch = _batch(np.random.default_rng(0), (4, 16))
    loss1, _, g1 = _loss_and_grads(model, tree, frozen, batch)
    for policy, tile in (("offload", 3), ("offload_all", 0), ("offload_all", 3)):
        changed = llama.Llama(model.config.replace(remat_policy=policy, seq_tile=tile))
        loss2, _, g2 = _loss_and_grads(changed, tree, frozen, batch)
        np.testing.assert_allclose(loss2, loss1, rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_offload_all_over_sequence_tiles_keeps_no_tile_intermediates():
    """Over sequence tiles each tile's MLP is recomputed in its own backward, so offload_all must
    not keep the tiles' gate, up and product for backward (stacked over layers and tiles): XLA:GPU
    failed to compile the host copies of those inside the nested scan (call issue18-x2a-730b0a3).
    Read from the lowered step, where kept values appear as arrays of that stacked shape."""
    model, frozen, tree = _setup(remat_policy="full")
    batch = _batch(np.random.default_rng(0), (2, 16))
    cfg, tile = model.config, 4
    stacked = f"tensor<{cfg.num_layers}x{16 // tile}x2x{tile}x{cfg.intermediate_size}xf32>"
    for policy, kept in (("offload_all", False), ("dots_saveable", True)):
        tiled = llama.Llama(cfg.replace(remat_policy=policy, seq_tile=tile))
        text = _compiled_loss_and_grads(tiled.config, 1).lower(tree, frozen, batch).as_text()
        assert (stacked in text) == kept, policy  # dots_saveable: the check can see kept tiles


def _tables_to_host(frozen):
    """The same weights with the embedding and head tables moved to pinned host memory."""
    shardings = jax.tree.map(lambda x: x.sharding, frozen)
    return jax.device_put(frozen, frozen_lib.tables_in_host_memory(shardings))


def test_tables_in_host_memory_train_as_on_the_device():
    """model.offload_embeddings: the embedding and head tables live in pinned host memory and are
    copied in where a step uses them; the arithmetic is the same, so losses and gradients agree
    (rtol 1e-6: only the copies and the fusion around them differ). On CPU, host memory is
    addressable by the computation anyway; experiments/gpu_smoke.py runs the option on GPUs."""
    model, frozen, tree = _setup(remat_policy="full")
    host = _tables_to_host(frozen)
    for name in ("embed_tokens", "lm_head"):
        assert host[name]["weight"].sharding.memory_kind == "pinned_host"
    assert host["layers"]["mlp"]["up_proj"]["weight"].packed.sharding.memory_kind != "pinned_host"
    batch = _batch(np.random.default_rng(0), (4, 16))
    loss1, _, g1 = _loss_and_grads(model, tree, frozen, batch)
    loss2, _, g2 = _loss_and_grads(model, tree, host, batch)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)


def test_embedding_rows_looked_up_on_the_host_train_as_the_table_on_the_device():
    """model.offload_embeddings alone: the token table stays in host memory (the head on the
    device) and each batch brings its tokens' rows (HostEmbeddingLookup), so the step never reads
    the table. The rows are the table's own values, so loss and gradients equal the on-device
    lookup's (rtol 1e-6: only the fusion around the lookup differs), also over accumulated
    micro-batches, whose rows carry the leading micro-batch axis as every batch array does."""
    model, frozen, tree = _setup(remat_policy="full")
    shardings = jax.tree.map(lambda x: x.sharding, frozen)
    host = jax.device_put(frozen, frozen_lib.tables_in_host_memory(shardings, embeddings=True, head=False))
    assert host["lm_head"]["weight"].sharding.memory_kind != "pinned_host"
    assert HostEmbeddingLookup(frozen).table is None  # table on the device: batches pass unchanged
    batch = _batch(np.random.default_rng(0), (4, 16))
    with_rows = HostEmbeddingLookup(host)(batch)
    table = np.asarray(frozen["embed_tokens"]["weight"])
    np.testing.assert_array_equal(with_rows["embeddings"], table[batch["inputs"]])
    loss1, _, g1 = _loss_and_grads(model, tree, frozen, batch)
    loss2, _, g2 = _loss_and_grads(model, tree, host, with_rows)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)
    micro = HostEmbeddingLookup(host)(jax.tree.map(lambda x: x.reshape(2, 2, 16), batch))
    loss3, _, g3 = _loss_and_grads(model, tree, host, micro, accumulation_steps=2)
    np.testing.assert_allclose(loss3, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)  # as the accumulation test: sums reordered
    table_index = next(i for i, x in enumerate(jax.tree.leaves(host)) if x is host["embed_tokens"]["weight"])

    def reads_table(batch) -> bool:
        closed = jax.make_jaxpr(
            lambda lora, frozen: step_lib.loss_sum(model, LORA, lora, frozen, batch, None)
        )(tree, host)
        table = closed.jaxpr.invars[len(jax.tree.leaves(tree)) + table_index]
        return any(table in e.invars for e in closed.jaxpr.eqns)

    assert not reads_table(with_rows) and reads_table(batch)


def test_the_head_is_copied_in_only_after_the_hidden_states():
    """With the head in host memory, its copy to the device takes the head from a barrier that
    also waits for the final hidden states, so XLA cannot issue it during the layers (where it
    would sit on the device beside their activations: 1 GiB for Llama 3's head)."""
    model, frozen, tree = _setup(remat_policy="full")
    host = _tables_to_host(frozen)
    batch = _batch(np.random.default_rng(0), (2, 16))
    closed = jax.make_jaxpr(lambda lora, frozen: step_lib.loss_sum(model, LORA, lora, frozen, batch, None))(
        tree, host
    )
    head_index = next(i for i, x in enumerate(jax.tree.leaves(host)) if x is host["lm_head"]["weight"])
    head = closed.jaxpr.invars[len(jax.tree.leaves(tree)) + head_index]
    barriers = [
        e for e in closed.jaxpr.eqns if e.primitive.name == "optimization_barrier" and head in e.invars
    ]
    assert len(barriers) == 1
    (barrier,) = barriers
    assert any(v.aval.shape[-1] == model.config.hidden_size and v.aval.ndim == 3 for v in barrier.invars)
    copies = [e for e in closed.jaxpr.eqns if e.primitive.name == "device_put"]
    copied = {v for e in copies for v in e.invars}
    assert head not in copied and copied & set(barrier.outvars)


def _sub_jaxprs(param):
    for value in param if isinstance(param, (tuple, list)) else [param]:
        if hasattr(value, "consts"):  # ClosedJaxpr (scan, remat, custom_vjp bodies)
            yield value.jaxpr
        elif hasattr(value, "eqns"):  # Jaxpr
            yield value


def _dot_counts(jaxpr, counts):
    """[attention dots, projection dots] in a jaxpr and its sub-jaxprs: dot_generals with and
    without batch dimensions."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, _), (batch_dims, _) = eqn.params["dimension_numbers"]
            counts[0 if batch_dims else 1] += 1
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                _dot_counts(sub, counts)
    return counts


def test_offload_policies_recompute_less_in_backward():
    """Per layer, full remat runs attention's two dots (q.k, p.v) again in backward;
    offload_attention keeps their results and runs them once; offload_all also keeps every
    projection's operands, so fewer projection dots run."""
    model, frozen, tree = _setup(remat_policy="full")
    batch = _batch(np.random.default_rng(0), (2, 16))
    counts = {}
    for policy in ("full", "offload", "offload_attention", "offload_all"):
        policy_model = llama.Llama(model.config.replace(remat_policy=policy))

        def loss_and_grads(lora, frozen, batch, m=policy_model):
            return step_lib.mean_loss_and_grads(m, LORA, lora, frozen, batch, None, 1, 1024)

        counts[policy] = _dot_counts(jax.make_jaxpr(loss_and_grads)(tree, frozen, batch).jaxpr, [0, 0])
    assert counts["offload"] == counts["full"]
    assert counts["offload_attention"][0] == counts["full"][0] - 2
    assert counts["offload_all"][0] == counts["offload_attention"][0]
    assert counts["offload_all"][1] < counts["offload_attention"][1] <= counts["full"][1]


@functools.cache
def _optimizer_and_step(offload: bool):
    """(config, optimizer, state shardings, compiled train step) on _setup()'s model, one per
    offload setting, shared by the tests below (one compile each)."""
    model, _, tree = _setup()
    cfg = OptimConfig(lr=1e-2, offload_state=offload, weight_decay=0.1)
    optimizer = make_optimizer(cfg)
    shardings = sharding.default_shardings(optimizer.init(tree))
    train_step = step_lib.make_train_step(model, LORA, cfg, optimizer, shardings if offload else None)
    return cfg, optimizer, shardings, train_step


def _committed_copy(tree):
    """A copy of tree, committed like the step's outputs, so the step compiles once (tree is reused)."""
    return jax.device_put(tree, sharding.default_shardings(tree), may_alias=False)


def test_offloaded_optimizer_state_lives_in_pinned_host_and_gives_the_same_updates():
    _, frozen, tree = _setup()
    results = {}
    for offload in (False, True):
        cfg, optimizer, shardings, train_step = _optimizer_and_step(offload)
        state = step_lib.init_opt_state(optimizer, tree, cfg, shardings)
        lora = _committed_copy(tree)
        for i in range(3):
            lora, state, _ = train_step(lora, state, frozen, _batch(np.random.default_rng(i), (2, 8)), None)
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
        assert kinds == ({"pinned_host"} if offload else {"device"})
        results[offload] = lora
    # same math; the barrier before the host-to-device copy changes XLA's fusion of the update,
    # so float32 rounding differs in the last bits (observed <= 1e-7 absolute on values ~1e-2)
    for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_only_the_lora_tree_is_differentiated():
    model, frozen, tree = _setup(quantization=None)
    batch = _batch(np.random.default_rng(0), (2, 8))
    jaxpr = jax.make_jaxpr(
        lambda lo, fr: step_lib.mean_loss_and_grads(model, LORA, lo, fr, batch, None, 1, 1024)
    )(tree, frozen)
    # the gradient outputs have exactly the lora tree's structure (traced, as the step's are)
    _, _, grads = jax.eval_shape(_compiled_loss_and_grads(model.config, 1), tree, frozen, batch)
    assert jax.tree.structure(grads) == jax.tree.structure(tree)
    assert len(jaxpr.out_avals) == 2 + len(jax.tree.leaves(tree))


def _saved_residuals(fn, *args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return out.getvalue().splitlines()


def _weight_shaped(lines: list[str], model_cfg) -> list[str]:
    shapes = set()
    for out_dim, in_dim in [
        (model_cfg.hidden_size, model_cfg.intermediate_size),
        (model_cfg.intermediate_size, model_cfg.hidden_size),
        (model_cfg.hidden_size, model_cfg.hidden_size),
        (model_cfg.num_kv_heads * model_cfg.head_dim, model_cfg.hidden_size),
    ]:
        shapes |= {f"{out_dim},{in_dim}", f"{in_dim},{out_dim}"}
    found = []
    for line in lines:
        m = re.match(r"\s*f\d+\[([\d,]+)\]", line)
        if m and any(m.group(1).endswith(s) for s in shapes):
            found.append(line)
    return found


def _plain_autodiff_matmul(x, weight, slices):
    """The frozen product without its custom VJP: what autodiff alone would keep for backward."""
    return linear._product(x, weight, 0, slices)


def test_saved_residuals_hold_no_dequantized_weight(monkeypatch):
    model, frozen, tree = _setup()  # the nf4 model the step tests build
    batch = _batch(np.random.default_rng(0), (1, 8))

    def loss(lo, fr):
        return step_lib.loss_sum(model, LORA, lo, fr, batch, None)[0]

    lines = _saved_residuals(loss, tree, frozen)
    assert lines and not _weight_shaped(lines, model.config), "\n".join(_weight_shaped(lines, model.config))
    # the same check catches the naive path: plain autodiff through dequantize keeps every weight
    monkeypatch.setattr(linear, "frozen_matmul", _plain_autodiff_matmul)
    assert _weight_shaped(_saved_residuals(loss, tree, frozen), model.config)


def _grad_temp_bytes(num_layers: int) -> int:
    """The compiled gradient's temp bytes, lowered on the frozen tree's shapes (never built)."""
    cfg = small_config(
        num_layers=num_layers, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=8
    )
    model = llama.Llama(cfg.replace(dtype="float32"))
    frozen = jax.eval_shape(lambda: llama.random_init(cfg, quantization="nf4", dtype="float32")[1])
    tree = lora_lib.init_lora(jax.random.key(0), frozen, model.config, LORA)
    batch = _batch(np.random.default_rng(0), (1, 8))
    fn = jax.jit(jax.grad(lambda lo, fr: step_lib.loss_sum(model, LORA, lo, fr, batch, None)[0]))
    return fn.lower(tree, frozen).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_grows_by_less_than_one_dequantized_layer(monkeypatch):
    # one layer's weights dequantized to float32: 4 * 512^2 + 3 * 512 * 1024 values * 4 bytes = 10 MiB
    layer_bytes = (4 * 512 * 512 + 3 * 512 * 1024) * 4
    growth = _grad_temp_bytes(6) - _grad_temp_bytes(2)
    print(f"temp growth 2->6 layers: {growth / 2**20:.2f} MiB; one fp32 layer: {layer_bytes / 2**20:.0f} MiB")
    assert growth < layer_bytes
    monkeypatch.setattr(linear, "frozen_matmul", _plain_autodiff_matmul)
    naive_growth = _grad_temp_bytes(6) - _grad_temp_bytes(2)
    assert naive_growth > 3 * layer_bytes  # without the custom VJP every layer's weight is kept


@pytest.mark.parametrize("offload", [False, True])
def test_train_step_donates_lora_and_opt_state(offload):
    _, frozen, tree = _setup()
    cfg, optimizer, shardings, train_step = _optimizer_and_step(offload)  # the offloaded-state test's compile
    state = step_lib.init_opt_state(optimizer, tree, cfg, shardings)
    lora = _committed_copy(tree)
    new_lora, _, metrics = train_step(lora, state, frozen, _batch(np.random.default_rng(0), (2, 8)), None)
    assert all(x.is_deleted() for x in jax.tree.leaves(lora))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_auto_remat_policy_offloads_attention_from_16k_tokens_per_row_where_the_host_holds_it(monkeypatch):
    """Llama-3-8B keeps 528 KB per token on the host with offload_attention (32 layers x (4096 x 2 B
    input + 4096 x 2 B output + 32 x 4 B statistics)): 69 GB at 131,072 tokens, over XLA's 64 GB
    default pool; 138 GB at 262,144, over a 128 GiB machine's (cli.py sizes the pool at 85%)."""
    from qlora_jax.models.presets import preset

    cfg = preset("llama3-8b")
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    monkeypatch.delenv(decoder.HOST_POOL_VARIABLE, raising=False)
    assert decoder.remat_policy_name("auto", cfg, 1, 16383) == "offload"
    assert decoder.remat_policy_name("auto", cfg, 1, 16384) == "offload_attention"
    assert decoder.remat_policy_name("auto", cfg, 1, 65536) == "offload_attention"
    assert decoder.remat_policy_name("auto", cfg, 1, 131072) == "offload"
    assert decoder.remat_policy_name("auto", cfg, 2, 65536) == "offload"  # the same tokens in two rows
    assert decoder.remat_policy_name("full", cfg, 1, 65536) == "full"
    monkeypatch.setenv(decoder.HOST_POOL_VARIABLE, "114")
    assert decoder.remat_policy_name("auto", cfg, 1, 131072) == "offload_attention"
    assert decoder.remat_policy_name("auto", cfg, 1, 262144) == "offload"
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)  # two GPUs' rows share the host
    assert decoder.remat_policy_name("auto", cfg, 1, 131072) == "offload"
