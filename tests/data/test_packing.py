"""Packing and bucketing: shifted targets, segment ids, positions, truncation accounting; and the
model's proof that packed examples do not see each other (loss equals the separate losses)."""

import numpy as np

from qlora_jax.data import packing
from qlora_jax.data.formats import Example


def _ex(ids, prompt_len=0):
    return Example(list(ids), [i >= prompt_len for i in range(len(ids))])


def test_pack_shifts_targets_and_restarts_positions():
    rows = packing.pack([_ex([1, 2, 3, 4], prompt_len=2), _ex([5, 6, 7])], seq_len=8)
    assert len(rows) == 1
    r = rows[0]
    np.testing.assert_array_equal(r["inputs"], [1, 2, 3, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(r["targets"], [2, 3, 4, 6, 7, 0, 0, 0])
    # target 2 is a prompt token (mask of token 1 in the example), 3 and 4 are completion
    np.testing.assert_array_equal(r["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(r["positions"], [0, 1, 2, 0, 1, 0, 0, 0])


def test_pack_starts_a_new_row_when_the_next_example_does_not_fit_and_counts_truncation():
    stats = packing.TruncationStats()
    rows = packing.pack(
        [_ex(range(1, 5)), _ex(range(1, 6)), _ex(range(1, 20)), _ex([9])], seq_len=6, stats=stats
    )
    assert [list(r["segment_ids"]) for r in rows] == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6]
    assert (stats.examples, stats.truncated_examples, stats.tokens_cut) == (4, 1, 12)  # 18 predictions -> 6
    assert "1 of 4 examples truncated (12 tokens cut)" in stats.describe()


def test_bucket_pads_each_example_to_the_smallest_bucket():
    out = packing.bucket([_ex(range(3)), _ex(range(7)), _ex(range(30))], buckets=(4, 8, 16))
    assert [len(out[b]) for b in (4, 8, 16)] == [1, 1, 1]
    assert out[16][0]["segment_ids"].sum() == 16  # the 29-prediction example was truncated to 16


def test_packed_examples_do_not_attend_across_boundaries():
    import jax

    from qlora_jax.models import llama
    from qlora_jax.train.step import loss_sum
    from tests.models.hf_reference import small_config

    model, frozen = llama.random_init(small_config(), quantization="nf4", dtype="float32")
    from qlora_jax import lora as lora_lib

    cfg = lora_lib.LoraConfig(target_modules="all-linear")
    rng = np.random.default_rng(0)
    examples = [_ex(rng.integers(0, 256, n), prompt_len=2) for n in (9, 5, 12)]
    packed = packing.stack(packing.pack(examples, seq_len=32))
    total_packed, n_packed = loss_sum(model, cfg, None, frozen, packed, None)
    separate = [packing.stack(packing.pack([e], seq_len=32)) for e in examples]
    totals = [loss_sum(model, cfg, None, frozen, b, None) for b in separate]
    assert float(n_packed) == sum(float(n) for _, n in totals)
    # float32, same math, different padding: agreement to ~1e-6 relative
    np.testing.assert_allclose(float(total_packed), sum(float(t) for t, _ in totals), rtol=1e-5)
    jax.clear_caches()


def test_segment_starts_give_each_example_start_then_the_last_end():
    rows = packing.pack([_ex([1, 2, 3, 4]), _ex([5, 6, 7]), _ex([8, 9])], seq_len=8)
    batch = packing.stack(rows + [packing.empty_row(8)], max_segments=4)
    # starts of examples 1-3 (3 and 2 and 1 predictions), the end of the last, unused slots -1;
    # the empty row has no example at all
    np.testing.assert_array_equal(batch["segment_starts"], [[0, 3, 5, 6, -1], [-1, -1, -1, -1, -1]])


def test_pack_closes_a_row_at_max_segments():
    rows = packing.pack([_ex([1, 2])] * 5, seq_len=16, max_segments=2)
    assert [int(r["segment_ids"].max()) for r in rows] == [2, 2, 1]
    with np.testing.assert_raises_regex(ValueError, "3 examples, more than max_segments=2"):
        packing.stack(packing.pack([_ex([1, 2])] * 3, seq_len=16), max_segments=2)
