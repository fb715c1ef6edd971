"""Packed rows on cuDNN's flash attention (attention.packed_flash_attention): the layout taken from
the pipeline's segment_starts, and the model's path through it. The kernel needs a GPU
(experiments/packed_attention_probe.py holds it to XLA there); here an XLA stand-in with the
kernel's arguments takes its place, leaving NaN where the kernel leaves its output unwritten."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import lora as lora_lib
from qlora_jax.data import packing
from qlora_jax.data.formats import Example
from qlora_jax.models import attention, llama
from qlora_jax.train.step import loss_sum
from tests.models.hf_reference import small_config


def test_layout_from_segment_starts():
    layout = attention.packed_layout(jnp.asarray([[0, 3, 5, 6, -1], [-1, -1, -1, -1, -1]]))
    np.testing.assert_array_equal(layout.offsets, [[0, 3, 5, -1, -1], [-1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(layout.lengths, [[3, 2, 1, -1], [-1, -1, -1, -1]])


@jax.custom_vjp
def _unwritten_gradient(x, written):
    """x as it is; its gradient NaN where `written` is False (B, T), as the kernel leaves it."""
    return x


def _unwritten_gradient_fwd(x, written):
    return x, written


def _unwritten_gradient_bwd(written, grad):
    return jnp.where(written[:, :, None, None], grad, jnp.nan), None


_unwritten_gradient.defvjp(_unwritten_gradient_fwd, _unwritten_gradient_bwd)


def _xla_kernel(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type, qkv_layout):
    """cuDNN's packed attention on XLA: causal inside each (offset, length) segment; NaN for tokens
    in no segment of this call, in the output and in the gradients, which the kernel does not write."""
    assert (mask_type, qkv_layout) == (attention.cudnn_attention.MaskType.PADDING_CAUSAL, "BTNH")
    _CALLS.append(q_seqlen.shape)
    t = jnp.arange(q.shape[1])
    inside = (t[None, None, :] >= q_offsets[:, :-1, None]) & (
        t[None, None, :] < (q_offsets[:, :-1] + q_seqlen)[:, :, None]
    )  # (B, M, T)
    segment = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)
    q, k, v = (_unwritten_gradient(x, segment >= 0) for x in (q, k, v))
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) & (t[:, None] >= t)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")
    return jnp.where((segment >= 0)[:, :, None, None], out, jnp.nan)


_CALLS: list[tuple[int, ...]] = []  # the (rows, slots) of each call of the stand-in


@pytest.mark.parametrize(
    ("remat", "slots_per_call", "call_slots"),
    [("offload_attention", 8, 8), ("full", 8, 8), ("full", 2, 2)],
)
def test_packed_rows_on_the_packed_kernel_equal_the_segment_mask(
    monkeypatch, remat, slots_per_call, call_slots
):
    """Loss and LoRA gradients of packed rows (3 examples in one row, padding after, an odd length
    the flash path pads to 64) through the packed path equal the (T, T) segment mask's on XLA,
    each row in calls of its own, its 32 slots 8 or 2 a call (PACKED_SLOTS_PER_CALL 2: the third
    example is in the second call, and NaN where a call leaves its output or gradient unwritten
    would reach the loss or the gradients if a call's were taken elsewhere).
    Float32, the same sums in another order: the loss to 1e-5 relative; the gradients, sums that
    cancel, to 1e-5 of the largest gradient (the mask path itself, run on the rows padded to 64,
    moves them by up to 1.5e-6 of it; attending across examples moves them by ~1e-2)."""
    monkeypatch.setattr(attention.cudnn_attention, "dot_product_attention", _xla_kernel)
    monkeypatch.setattr(attention, "PACKED_SLOTS_PER_CALL", slots_per_call)
    _CALLS.clear()
    rng = np.random.default_rng(0)
    examples = [Example(list(rng.integers(0, 256, n)), [i >= 2 for i in range(n)]) for n in (9, 5, 12, 20)]
    batch = packing.stack(packing.pack(examples, seq_len=37, max_segments=4))
    assert batch["segment_ids"].max() == 3 and batch["segment_ids"][-1, -1] == 0  # padding at the end
    lora_cfg = lora_lib.LoraConfig(r=4, target_modules="all-linear")
    results = {}
    for impl, starts in (("cudnn", batch["segment_starts"]), ("xla", None)):
        model, frozen = llama.random_init(
            small_config(attention_impl=impl, remat_policy=remat), quantization="nf4", dtype="float32"
        )
        adapters = lora_lib.init_lora(jax.random.key(0), frozen, model.config, lora_cfg)
        adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B = 0 at init: no gradient to A

        def loss(tree, model=model, frozen=frozen, starts=starts):
            total, count = loss_sum(model, lora_cfg, tree, frozen, dict(batch, segment_starts=starts), None)
            return total / count

        results[impl] = jax.jit(jax.value_and_grad(loss))(adapters)
    assert set(_CALLS) == {(1, call_slots)}  # every call of one shape: one row, the call's slots
    (loss_packed, grads_packed), (loss_masked, grads_masked) = results["cudnn"], results["xla"]
    assert np.isfinite(float(loss_packed))
    np.testing.assert_allclose(float(loss_packed), float(loss_masked), rtol=1e-5)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_masked))
    for got, want in zip(jax.tree.leaves(grads_packed), jax.tree.leaves(grads_masked), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * largest)
