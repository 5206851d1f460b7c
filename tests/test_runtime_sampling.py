"""Sampler: greedy, penalty, temperature, top-k/top-p/min-p filtering, seeding, large vocabularies."""

import numpy as np
import pytest

from qwen_edge.errors import QwenEdgeError
from qwen_edge.sampling import Sampler, SamplingParams

VOCAB = 151936


def draws(params, logits, n=4000, seen=None):
    sampler = Sampler(params)
    return np.array([sampler(logits, seen) for _ in range(n)])


def test_greedy_is_argmax_and_leaves_logits_alone():
    logits = np.random.default_rng(1).normal(size=VOCAB).astype(np.float32)
    before = logits.copy()
    assert Sampler(SamplingParams())(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(repetition_penalty=1.3))(logits, np.array([5, 7])) == int(np.argmax(before))
    np.testing.assert_array_equal(logits, before)


def test_repetition_penalty_is_sign_aware():
    logits = np.array([2.0, -1.0, 1.9, -1.5], dtype=np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    # token 0: 2.0 / 2 = 1.0 < 1.9, so token 2 wins
    assert sampler(logits, np.array([0])) == 2
    # negative logits are multiplied: token 3 (-1.5 -> -3.0) can never beat token 1 (-1.0)
    only_negative = np.array([-1.0, -1.2], dtype=np.float32)
    assert sampler(only_negative, np.array([0, 0])) == 1  # -1.0 * 2 = -2.0 < -1.2


def test_temperature_sampling_matches_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    counts = np.bincount(draws(SamplingParams(temperature=1.0, seed=0), logits, 20000), minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.015)
    # low temperature sharpens
    sharp = np.bincount(draws(SamplingParams(temperature=0.25, seed=0), logits, 4000), minlength=3) / 4000
    assert sharp[0] > 0.85


def test_top_k_keeps_only_the_k_best():
    logits = np.random.default_rng(2).normal(size=VOCAB).astype(np.float32)
    best = set(np.argsort(logits)[-5:].tolist())
    out = draws(SamplingParams(temperature=5.0, top_k=5, seed=3), logits, 500)
    assert set(out.tolist()) == best


def _reference_top_p(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    return set(order[: int(np.searchsorted(cum, top_p)) + 1].tolist())


def test_top_p_on_a_flat_large_vocabulary_grows_the_candidate_set():
    # a flat distribution needs thousands of candidates for 0.5 of the mass: the sorted set must grow past 64
    logits = np.random.default_rng(4).normal(scale=2.0, size=VOCAB).astype(np.float32)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    allowed = _reference_top_p(probs, 0.5)
    assert len(allowed) > 1000
    out = draws(SamplingParams(temperature=1.0, top_p=0.5, seed=5), logits, 300)
    assert set(out.tolist()) <= allowed
    assert len(set(out.tolist())) > 200


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = np.log(np.array([0.45, 0.35, 0.15, 0.05], dtype=np.float32))
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.4, seed=0), logits, 500).tolist()) == {0}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0), logits, 2000).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.9, seed=0), logits, 2000).tolist()) == {0, 1, 2}


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.12, 0.08], dtype=np.float32))
    # 0.2 * 0.5 = 0.1: token 3 (0.08) is dropped, token 2 (0.12) kept
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.2, seed=0), logits, 3000).tolist()) == {0, 1, 2}


def test_filters_combine_with_top_k():
    logits = np.random.default_rng(6).normal(size=VOCAB).astype(np.float32)
    top = np.argsort(logits)[::-1]
    out = draws(SamplingParams(temperature=1.0, top_k=50, top_p=0.3, min_p=0.05, seed=1), logits, 500)
    assert set(out.tolist()) <= set(top[:50].tolist())


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(7).normal(size=VOCAB).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=123)
    a, b = draws(params, logits, 200), draws(params, logits, 200)
    np.testing.assert_array_equal(a, b)
    c = draws(SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=124), logits, 200)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 1.0}, {"repetition_penalty": 0}],
)
def test_bad_parameters_are_one_line_errors(kwargs):
    with pytest.raises(QwenEdgeError, match="must be"):
        SamplingParams(**kwargs)
