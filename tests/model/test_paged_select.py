"""A decode step's selection over the page sums (model/paged_select) chooses the keys that
`paged_cache.select` chooses over the gathered keys, for sequences on both sides of hi_min_len, batched alone
or mixed, with SI on and off and pages smaller than, equal to, larger than and out of step with HI's blocks;
the page sums stay the sums of the page rows whatever the writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
from longcat_jax.config import Config
from longcat_jax.model import paged_cache, paged_select

# K = 16, SI init 2 / local 4, HI blocks of 4 (top 3) once a sequence passes 20 keys
CFG = Config.tiny(hi_min_len=20, kernel_impl="xla")
LONG = [21, 24, 33, 47, 48, 49, 64]  # 48 and 64 end a block: without SI the query's own block is a candidate
SHORT = [5, 16, 20]


def decode_inputs(cfg, page_size, lengths, seed=0):
    """Pool 1 of two pools of random index-key pages (rows past a sequence's length hold stale values), their
    page sums, shuffled page tables wide enough for HI, and one new query per sequence at length - 1:
    (index_k, index_sum, table, q, w, new [B, 1, J], q_pos [B])."""
    rng = np.random.default_rng(seed)
    B, I, J = len(lengths), cfg.index_n_heads, cfg.index_head_dim
    W = -(-max(max(lengths), cfg.hi_min_len + 1) // page_size) + 2
    P = B * W + 3
    index_k = jnp.asarray(rng.standard_normal((1, 2, P, page_size, J), np.float32))
    index_sum = paged_cache.index_sums(index_k, paged_cache.sum_span(cfg, page_size))
    table = jnp.asarray(rng.permutation(P)[: B * W].reshape(B, W), jnp.int32)
    shapes = ((B, 1, I, J), (B, 1, I), (B, 1, J))
    q, w, new = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)
    return index_k, index_sum, table, q, w, new, jnp.asarray(lengths, jnp.int32) - 1


def selections(cfg, inputs, new_lens=None):
    """(paged_select.select's indices, paged_cache.select's over the gathered keys), sorted, [B, K]."""
    index_k, index_sum, table, q, w, new, q_pos = inputs
    B = q.shape[0]
    new_lens = jnp.ones(B, jnp.int32) if new_lens is None else jnp.asarray(new_lens, jnp.int32)
    seq_lens = q_pos + new_lens
    keys = paged_select.index_pages(index_k, index_sum, table, 1, new[:, 0])
    got = jax.jit(paged_select.select, static_argnums=5)(q, keys, w, q_pos, new_lens, cfg)
    gathered = paged_cache.gather_rows(index_k, table, 1)
    gathered = paged_cache.overlay_rows(gathered, new, q_pos[:, None], new_lens)
    S = gathered.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    ref = paged_cache.select(q, gathered, w, q_pos[:, None], k_pos, cfg, k_pos < seq_lens[:, None], seq_lens)
    return np.sort(np.asarray(got)[:, 0], -1), np.sort(np.asarray(ref)[:, 0], -1)


@pytest.mark.parametrize("si", [True, False])
@pytest.mark.parametrize("page_size", [2, 4, 6, 8])
def test_decode_selection_equals_the_reference_rule(si, page_size):
    cfg = CFG.replace(si_enabled=si)
    for seed, lengths in enumerate([LONG, SHORT, SHORT[:1] + LONG[:3] + SHORT[1:] + LONG[3:]]):
        got, ref = selections(cfg, decode_inputs(cfg, page_size, lengths, seed))
        np.testing.assert_array_equal(got, ref)
    # HI matters for the long sequences: the flat rule would choose otherwise
    inputs = decode_inputs(cfg, page_size, LONG)
    flat, _ = selections(cfg.replace(hi_enabled=False), inputs)
    got, _ = selections(cfg, inputs)
    assert (flat != got).any(-1).sum() >= len(LONG) // 2


def test_each_row_is_chosen_as_if_alone():
    """A sequence's keys do not depend on what is batched with it: short or long neighbours, or a padding row
    (no new token) beside long ones."""
    inputs = decode_inputs(CFG, 4, [LONG[2], SHORT[0], LONG[4], 1], seed=3)
    batched, _ = selections(CFG, [x[:3] if i > 1 else x for i, x in enumerate(inputs)])
    for b in range(3):
        alone, _ = selections(CFG, [x[b:b + 1] if i > 1 else x for i, x in enumerate(inputs)])
        np.testing.assert_array_equal(alone[0], batched[b])
    long_and_padding = [x[2:] if i > 1 else x for i, x in enumerate(inputs)]
    padded, _ = selections(CFG, long_and_padding, new_lens=[1, 0])
    np.testing.assert_array_equal(padded[0], batched[2])


def test_page_sums_follow_rewritten_rows():
    """After writes (a prefill chunk across pages with padding, a rewrite of the same positions as a preempted
    request's recompute would do, decode rows) every page's sums equal the sums of its rows."""
    span = paged_cache.sum_span(CFG, 8)  # pages of 8 rows, HI blocks of 4: two runs per page
    rng = np.random.default_rng(0)
    P, L, J = 6, 2, CFG.index_head_dim
    index_k = jnp.zeros((L, 1, P, 8, J), jnp.float32)
    index_sum = paged_cache.index_sums(index_k, span)
    table = jnp.asarray([[3, 1, 4], [0, 5, 2]], jnp.int32)

    def write(index_k, index_sum, starts, new_lens, T):
        positions = jnp.asarray(starts, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
        new_lens = jnp.asarray(new_lens, jnp.int32)
        slots = paged_cache.row_slots(table, positions, new_lens, P, 8)
        rows = jnp.asarray(rng.standard_normal((L, 1, 2, T, J), np.float32))
        index_k = paged_cache.write_rows(index_k, rows, slots)
        pages = paged_cache.written_pages(slots, positions, 8, P)
        return index_k, paged_cache.write_index_sums(index_sum, index_k, pages)

    for starts, new_lens, T in [([0, 3], [13, 9], 13), ([0, 3], [13, 9], 13), ([13, 12], [1, 1], 1),
                                ([5, 0], [11, 0], 11)]:
        before = index_sum
        index_k, index_sum = write(index_k, index_sum, starts, new_lens, T)
        np.testing.assert_allclose(index_sum, paged_cache.index_sums(index_k, span), rtol=1e-6, atol=1e-6)
    # the last write's padding row touched nothing of sequence 1's pages
    np.testing.assert_array_equal(index_sum[:, :, [0, 5, 2]], before[:, :, [0, 5, 2]])


def test_paged_step_decode_reads_no_gathered_index_keys():
    """The engine's decode step takes the page-sum selection: its program gathers no sequence's full index
    keys, copies no pool, and leaves the page sums equal to the page rows."""
    from longcat_jax.model.longcat import jit_paged_step

    model = lj.build_model(Config.tiny(vocab_size=384), seed=0)
    cfg, P, page, W = model.cfg, 40, 4, 16
    rng = np.random.default_rng(0)
    cache = paged_cache.init_paged_cache(cfg, P, page)
    index_k = jnp.asarray(rng.standard_normal(cache.index_k.shape, np.float32))
    cache = cache.replace(index_k=index_k,
                          index_sum=paged_cache.index_sums(index_k, paged_cache.sum_span(cfg, page)))
    table = jnp.asarray(rng.permutation(P)[: 2 * W].reshape(2, W), jnp.int32)
    tokens, starts = jnp.asarray([[5], [7]], jnp.int32), jnp.asarray([40, 30], jnp.int32)
    args = (tokens, starts, jnp.ones(2, jnp.int32), table)
    history = jnp.zeros((2, cfg.ngram_n - 1), jnp.int32)
    step, params = jit_paged_step(model, True)
    text = step.lower(params, *args, cache, history).compile().as_text()
    J = cfg.index_head_dim
    assert f"f32[2,{W * page},{J}]" not in text and f"f32[2,{W},{page},{J}]" not in text
    for pool in (cache.kv, cache.index_k, cache.index_sum):
        shape = "f32[{}]".format(",".join(map(str, pool.shape)))
        assert not [line for line in text.splitlines() if shape in line and " copy(" in line]
    _, cache = step(params, *args, cache, history)
    sums = paged_cache.index_sums(cache.index_k, paged_cache.sum_span(cfg, page))
    np.testing.assert_allclose(cache.index_sum, sums, rtol=1e-6, atol=1e-6)
