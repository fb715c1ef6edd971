"""Sources (local files through datasets, the built-in task), deterministic epochs and exact resume."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from qlora_jax.data import pipeline, sources
from qlora_jax.data.formats import Example, FormatConfig

ROWS = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_local_files_load_through_datasets(tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif ext == "json":
        path.write_text(json.dumps(ROWS))
    elif ext == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(path)
    assert sources.load_rows(str(path)) == ROWS


def test_text_files_give_text_rows(tmp_path):
    (tmp_path / "t.txt").write_text("first line\nsecond line\n")
    assert sources.load_rows(str(tmp_path / "t.txt")) == [{"text": "first line"}, {"text": "second line"}]


GSM8K_SAMPLE = os.path.join(os.path.dirname(__file__), "fixtures", "gsm8k_test_head24.jsonl")


def test_gsm8k_rows_load_in_chat_format(smollm2_tokenizer):
    rows = sources.load_rows(GSM8K_SAMPLE)
    assert len(rows) == 24 and set(rows[0]) == {"question", "answer"}
    examples = pipeline.tokenize(rows[:5], smollm2_tokenizer, FormatConfig("chat", "question", "answer"))
    assert all(sum(e.loss_mask) > 5 for e in examples)


def test_hub_dataset_spec_names_config_and_split(monkeypatch):
    """GSM8K as users get it: "openai/gsm8k:main:test"; the run's role is the default split."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or [{"q": 1}])
    assert sources.load_rows("openai/gsm8k:main:test", "eval") == [{"q": 1}]
    sources.load_rows("openai/gsm8k:main", "train")
    sources.load_rows("org/plain_name", "eval")
    assert calls == [
        (("openai/gsm8k", "main"), {"split": "test"}),
        (("openai/gsm8k", "main"), {"split": "train"}),
        (("org/plain_name", None), {"split": "eval"}),
    ]


def test_builtin_addition_splits_never_share_a_question():
    train = sources.load_rows("builtin:addition", "train", seed=0)
    held_out = sources.load_rows("builtin:addition", "eval", seed=0)
    assert len(train) == 8100 - 200 and len(held_out) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert sources.load_rows("builtin:addition:50", "train", seed=3) != sources.load_rows(
        "builtin:addition:50"
    )


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("missing.jsonl", FileNotFoundError, "data file not found: missing.jsonl"),
        ("./nope/dir", FileNotFoundError, "neither an existing file"),
        ("builtin:multiply", ValueError, "unknown built-in task 'multiply'"),
        ("", ValueError, "set data.train_path"),
    ],
)
def test_bad_sources_are_named(spec, error, match):
    with pytest.raises(error, match=match):
        sources.load_rows(spec)


def _examples(n=40):
    rng = np.random.default_rng(0)
    return [Example(list(rng.integers(1, 100, rng.integers(3, 12))), [True] * 12) for _ in range(n)]


def test_epochs_are_deterministic_by_seed_and_resume_exactly():
    cfg = pipeline.BatchingConfig(max_seq_len=16, batch_size=2, seed=5)
    run = pipeline.BatchIterator(_examples(), cfg)
    straight = [next(run) for _ in range(12)]  # crosses an epoch boundary
    assert run.epoch >= 1
    resumed = pipeline.BatchIterator(_examples(), cfg)
    [next(resumed) for _ in range(5)]
    saved = resumed.state()
    fresh = pipeline.BatchIterator(_examples(), cfg)
    fresh.restore(saved)
    for a, b in zip(straight[5:], [next(fresh) for _ in range(7)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_seed = pipeline.BatchIterator(
        _examples(), pipeline.BatchingConfig(max_seq_len=16, batch_size=2, seed=6)
    )
    assert not np.array_equal(next(other_seed)["inputs"], straight[0]["inputs"])


def test_bucketed_batches_have_a_few_static_shapes_and_accumulation_adds_an_axis():
    cfg = pipeline.BatchingConfig(max_seq_len=16, batch_size=2, packing=False, accumulation_steps=2)
    it = pipeline.BatchIterator(_examples(), cfg)
    shapes = {next(it)["inputs"].shape for _ in range(it.batches_per_epoch())}
    assert shapes <= {(2, 2, 4), (2, 2, 8), (2, 2, 16)}


def test_eval_batches_pad_with_rows_outside_the_loss():
    batches = pipeline.eval_batches(_examples(5), pipeline.BatchingConfig(max_seq_len=64, batch_size=4))
    assert len(batches) == 1 and batches[0]["inputs"].shape == (4, 64)
    assert batches[0]["loss_mask"][1:].sum() == 0


def test_too_little_data_for_one_batch_is_explained():
    it = pipeline.BatchIterator(_examples(2), pipeline.BatchingConfig(max_seq_len=64, batch_size=4))
    with pytest.raises(ValueError, match="make no full batch of 4 rows"):
        next(it)
