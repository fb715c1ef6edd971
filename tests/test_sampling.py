"""Sampling filters against direct float64 numpy definitions of HF's top-k / top-p warpers."""

import jax
import numpy as np
import pytest

from qlora_jax.sampling import SamplingConfig, filter_logits, next_token

LOGITS = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]], np.float32))


def _kept(cfg):
    return np.isfinite(np.asarray(filter_logits(LOGITS, cfg)))[0].tolist()


def test_top_k_keeps_the_k_most_likely():
    assert _kept(SamplingConfig(1.0, top_k=2)) == [True, True, False, False, False]


@pytest.mark.parametrize(
    ("top_p", "expected"), [(0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (0.96, 5), (1e-6, 1)]
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, expected):
    # HF TopPLogitsWarper: a token stays while the mass of more likely tokens is below top_p
    assert sum(_kept(SamplingConfig(1.0, top_p=top_p))) == expected


def test_greedy_and_degenerate_filters_pick_the_argmax():
    key = jax.random.key(0)
    for cfg in (SamplingConfig(), SamplingConfig(1.0, top_k=1), SamplingConfig(1.0, top_p=1e-6)):
        assert int(next_token(LOGITS, key, cfg)[0]) == 0


def test_sampling_frequencies_follow_tempered_softmax():
    # 20000 draws: each frequency is within 4 standard errors (~0.014) of softmax(logits / T)
    cfg = SamplingConfig(temperature=2.0)
    logits = np.repeat(LOGITS, 20000, axis=0)
    draws = np.asarray(next_token(logits, jax.random.key(1), cfg))
    expected = np.exp(LOGITS[0].astype(np.float64) / 2.0)
    expected /= expected.sum()
    freq = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(0.25 / draws.size))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_sampling_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
