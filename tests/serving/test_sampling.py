"""Sampling rules and the page pool, on plain numbers (no model)."""

import numpy as np

from longcat_jax.serving.pages import PagePool, page_hashes
from longcat_jax.serving.params import SamplingParams
from longcat_jax.serving.sampling import apply_penalties, filtered_probs, sample

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))


def test_top_k_top_p_min_p_keep_the_expected_tokens():
    def support(**kw):
        return np.flatnonzero(filtered_probs(LOGITS.copy(), SamplingParams(**kw))).tolist()

    assert support() == [0, 1, 2, 3]
    assert support(top_k=2) == [0, 1]
    assert support(top_p=0.5) == [0]  # the smallest prefix whose mass reaches 0.5
    assert support(top_p=0.7) == [0, 1]
    assert support(min_p=0.3) == [0, 1]  # p >= 0.3 * 0.5
    np.testing.assert_allclose(filtered_probs(LOGITS.copy(), SamplingParams(top_k=2)), [2 / 3, 1 / 3, 0, 0],
                               rtol=1e-6)


def test_penalties():
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    out = apply_penalties(logits.copy(), SamplingParams(repetition_penalty=2.0), [0], {1: 3})
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    out = apply_penalties(logits.copy(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [0],
                          {1: 3, 2: 1})
    np.testing.assert_allclose(out, [2.0, -2.0 - 0.5 - 0.75, 1.0 - 0.5 - 0.25, 0.5])


def test_seeded_draws_repeat_and_follow_the_distribution():
    params = SamplingParams(temperature=1.0, seed=3)

    def draws(seed, n=4000):
        rng = np.random.default_rng(seed)
        return [sample(LOGITS, params, [], {}, rng)[0] for _ in range(n)]

    a = draws(3)
    assert a == draws(3) and a != draws(4)
    np.testing.assert_allclose(np.bincount(a, minlength=4) / len(a), [0.5, 0.25, 0.15, 0.1], atol=0.03)
    token, lp = sample(LOGITS, SamplingParams(temperature=0, logprobs=2), [], {}, None, vocab_limit=None)
    assert token == 0 and lp.top[1][0] == 1 and np.isclose(lp.logprob, np.log(0.5))
    assert sample(LOGITS, SamplingParams(temperature=0), [], {}, None, vocab_limit=1)[0] == 0
    assert sample(-LOGITS, SamplingParams(temperature=0), [], {}, None, vocab_limit=2)[0] == 1


def test_page_pool_counts_shares_and_evicts():
    pool = PagePool(3, 2)
    a, b = pool.allocate(), pool.allocate()
    h = page_hashes([5, 6, 7, 8, 9], 2)
    assert len(h) == 2 and page_hashes([5, 6, 7, 0], 2)[0] == h[0] and page_hashes([5, 6, 7, 0], 2)[1] != h[1]
    pool.register(a, h[0])
    pool.register(b, h[1])
    assert pool.lookup(h) == [a, b] and pool.used == 2  # shared: two references each
    pool.release([a, b])
    pool.release([a, b])
    assert pool.used == 0 and pool.available == 3
    assert pool.lookup(h[:1]) == [a]  # an idle registered page is found again
    pool.release([a])
    taken = [pool.allocate() for _ in range(3)]  # the free page first, then the idle ones, oldest first
    assert sorted(taken) == [0, 1, 2] and pool.allocate() is None and pool.lookup(h) == []
