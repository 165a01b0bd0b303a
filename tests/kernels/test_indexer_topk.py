"""Fused indexer scoring + streaming top-k (pallas_kernels/indexer_topk.py) vs model.indexer.select.

Both paths ("xla" chunked over query blocks, "pallas" in interpret mode) must give the reference's exact
int32 indices, slot order included, across SI/HI on and off, dense short rows, ragged key validity, packed
documents, keys from a cache, unordered key positions, a fully forced window, exact ties and bf16 inputs.
Blocks are small (block_k below K), so every call streams several key tiles through the running top-K merge.
The HI tests at S = 256 cover the xla gather path (and its full-row fallback), the pallas tile plan and the
linear-memory block pooling; one checks from the jaxpr that the gather path never builds a [bq, S] array.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.config import Config
from longcat_jax.model import indexer as ix
from longcat_jax.ops.block_keys import block_keys
from pallas_kernels import indexer_topk as kt
from pallas_kernels.indexer_hi import _hi_tile_plan
from pallas_kernels.si_window import window_indices

IMPLS = ["xla", "pallas"]
# K = 16, init 2, local 4, HI blocks of 4 (top 3) once S > hi_min_len.
CFG = Config.tiny(hi_min_len=20)


def inputs(seed, B, T, S, I=2, J=16, dtype=jnp.float32):
    """Random q, k, w made with numpy (eager jax.random would compile a kernel per shape)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((B, T, I, J), (B, S, J), (B, T, I)))


def arange_positions(B, n, offset=0):
    return jnp.asarray(np.reshape(offset, (-1, 1)) + np.broadcast_to(np.arange(n), (B, n)), jnp.int32)


def reference(q, k, w, qp, kp, cfg, k_valid=None, q_seg=None, k_seg=None):
    return np.asarray(_reference_select(q, k, w, qp, kp, cfg, k_valid, q_segment_ids=q_seg,
                                        k_segment_ids=k_seg))


# Jitted: one compile per shape instead of one per eager op.
_reference_select = jax.jit(ix.select, static_argnums=5)


def check(impl, q, k, w, qp, kp, cfg, k_valid=None, q_seg=None, k_seg=None, block_q=16, block_k=8):
    """Asserts the kernel equals the reference exactly; returns the reference indices."""
    ref = reference(q, k, w, qp, kp, cfg, k_valid, q_seg, k_seg)
    out = kt.select(q, k, w, qp, kp, cfg, k_valid=k_valid, q_segment_ids=q_seg, k_segment_ids=k_seg,
                    impl=impl, block_q=block_q, block_k=block_k)
    assert out.dtype == jnp.int32 and out.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(out), ref)
    return ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("si", [True, False])
@pytest.mark.parametrize("hi", [True, False])
def test_matches_reference(impl, si, hi):
    """T = S = 37, a multiple of neither block_q = 16 nor block_k = 8: 3 query blocks, up to 5 key tiles."""
    cfg = dataclasses.replace(CFG, si_enabled=si, hi_enabled=hi)
    B, T = 2, 37
    q, k, w = inputs(0, B, T, T)
    pos = arange_positions(B, T)
    ref = check(impl, q, k, w, pos, pos, cfg)
    # Each switch changes the selection here, so the equality above covers its rule.
    for flipped in (dict(hi_enabled=not hi), dict(si_enabled=not si)):
        assert (reference(q, k, w, pos, pos, dataclasses.replace(cfg, **flipped)) != ref).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [10, 16])
def test_short_rows_are_dense(impl, T):
    """T < K and T == K: every row holds at most K causal keys, so each takes all of them (HI active)."""
    cfg = dataclasses.replace(CFG, hi_min_len=8)
    assert ix.use_hierarchical(cfg, T)
    q, k, w = inputs(1, 2, T, T)
    pos = arange_positions(2, T)
    ref = check(impl, q, k, w, pos, pos, cfg, block_q=8)
    for t in range(T):
        row = ref[0, t]
        assert sorted(row[row >= 0].tolist()) == list(range(t + 1)) and (row[t + 1 :] == -1).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_k_valid(impl):
    """Per-row key lengths via k_valid [B,S]; invalid keys are never picked and HI pools only valid keys."""
    B, T = 3, 36
    q, k, w = inputs(2, B, T, T)
    pos = arange_positions(B, T)
    k_valid = jnp.asarray(np.arange(T)[None, :] < np.array([36, 20, 7])[:, None])
    ref = check(impl, q, k, w, pos, pos, CFG, k_valid=k_valid)
    assert (ref[2] < 7).all() and (ref[2] == -1).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents(impl):
    """Packed rows: segment ids 1, 2, ..., positions restarting per document, 0 = padding at the end
    (also invalid in k_valid). HI's means pool every key k_valid admits, whatever its document."""
    B, T = 2, 48
    q, k, w = inputs(3, B, T, T)
    seg = np.zeros((B, T), np.int32)
    seg[0, :20], seg[0, 20:44] = 1, 2
    seg[1, :5], seg[1, 5:35], seg[1, 35:] = 1, 2, 3
    new_piece = np.diff(seg, axis=1, prepend=-1) != 0
    starts = np.maximum.accumulate(np.where(new_piece, np.arange(T), 0), axis=1)
    pos = jnp.asarray(np.arange(T) - starts, jnp.int32)
    seg, k_valid = jnp.asarray(seg), jnp.asarray(seg > 0)
    ref = check(impl, q, k, w, pos, pos, CFG, k_valid=k_valid, q_seg=seg, k_seg=seg)
    # No query of document 2 in row 0 picks a key of document 1.
    picks = ref[0, 20:44]
    assert ((picks == -1) | (picks >= 20)).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 8])
def test_keys_from_cache(impl, T):
    """Decode / chunked prefill: 64 cache slots, queries at cache_len + arange(T), unwritten slots invalid."""
    B, S = 2, 64
    cache_len = np.array([40, 56 - T], np.int32)
    q, k, w = inputs(4, B, T, S)
    qp = arange_positions(B, T, cache_len)
    kp = arange_positions(B, S)
    k_valid = jnp.asarray(np.arange(S)[None, :] < (cache_len + T)[:, None])
    select = jax.jit(kt.select, static_argnames=("cfg", "impl", "block_q", "block_k"))
    ref = reference(q, k, w, qp, kp, CFG, k_valid)
    out = select(q, k, w, qp, kp, CFG, k_valid=k_valid, impl=impl, block_q=8, block_k=16)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert ((ref >= 0).sum(-1) >= 8).all() and (ref < (cache_len + T)[:, None, None]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_unordered_key_positions(impl):
    """Cache slots in ring-buffer order (slot != position): the causal key-block bound must stay exact."""
    B, S, T = 2, 40, 12
    q, k, w = inputs(5, B, T, S)
    kp = jnp.asarray(np.stack([(np.arange(S) + 13) % S, (np.arange(S) * 7) % S]), jnp.int32)
    qp = arange_positions(B, T, [24, 30])
    check(impl, q, k, w, qp, kp, CFG, block_q=4, block_k=8)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_keys_forced(impl):
    """A local window wider than S forces every causal key (+inf), so rows are 0..t in index order."""
    cfg = dataclasses.replace(CFG, index_topk=64, index_local_tokens=60)
    T = 48
    q, k, w = inputs(6, 1, T, T)
    pos = arange_positions(1, T)
    ref = check(impl, q, k, w, pos, pos, cfg)
    expected = np.where(np.arange(64)[None, :] <= np.arange(T)[:, None], np.arange(64)[None, :], -1)
    np.testing.assert_array_equal(ref[0], expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("si, hi", [(True, True), (False, False)])
def test_exact_ties(impl, si, hi):
    """Small-integer q, k, w and only 3 distinct keys: scores are exact and tie massively, so both the K
    boundary and the slot order depend on the lower-index-first rule (inside a tile and across tiles)."""
    cfg = dataclasses.replace(CFG, si_enabled=si, hi_enabled=hi)
    B, T, I, J = 2, 40, 2, 16
    rng = np.random.default_rng(7)
    q = rng.integers(-2, 3, (B, T, I, J)).astype(np.float32)
    w = rng.integers(-1, 3, (B, T, I)).astype(np.float32)
    distinct = rng.integers(-2, 3, (B, 3, J)).astype(np.float32)
    k = distinct[:, rng.integers(0, 3, T)]
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    ref = check(impl, *map(jnp.asarray, (q, k, w, pos, pos)), cfg)
    # Ties really decide the slot order: some row holds equal scores in consecutive dynamic slots. Integer
    # inputs make numpy's scores exact.
    scores = np.einsum("bti,btis->bts", w, np.maximum(np.einsum("btij,bsj->btis", q, k), 0))
    kp, qp = pos[:, None, :], pos[:, :, None]
    forced = (kp < cfg.index_init_tokens) | (kp > qp - cfg.index_local_tokens)
    picked = np.take_along_axis(scores, np.maximum(ref, 0), axis=-1)
    dynamic = (ref >= 0) & ~np.take_along_axis(forced & si, np.maximum(ref, 0), axis=-1)
    assert ((picked[..., 1:] == picked[..., :-1]) & dynamic[..., 1:] & dynamic[..., :-1]).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl):
    q, k, w = inputs(8, 2, 33, 33, dtype=jnp.bfloat16)
    pos = arange_positions(2, 33)
    check(impl, q, k, w, pos, pos, CFG)


@pytest.mark.parametrize("impl", IMPLS)
def test_inside_grad(impl):
    """Selection is a constant for autodiff: grad flows only through the caller's own use of q."""
    q, k, w = inputs(9, 1, 8, 8)
    pos = arange_positions(1, 8)

    def loss(q):
        idx = kt.select(q, k, w, pos, pos, CFG, impl=impl, block_q=8, block_k=8)
        has_4_keys = (idx[..., 3:4] >= 0).astype(jnp.float32)[..., None]  # [B,T,1,1]
        return jnp.sum(q**2 * has_4_keys)

    idx = np.asarray(kt.select(q, k, w, pos, pos, CFG, impl=impl, block_q=8, block_k=8))
    expected = 2 * np.asarray(q) * (idx[..., 3:4] >= 0)[..., None]
    assert 0 < (idx[..., 3] >= 0).sum() < 8
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss))(q)), expected)


def test_bad_inputs():
    q, k, w = (np.asarray(x) for x in inputs(0, 1, 8, 8))
    pos = np.asarray(arange_positions(1, 8))
    cases = [
        (dict(impl="cuda"), "impl must be one of"),
        (dict(q=q[0]), "q must be"),
        (dict(k=k[..., :4]), "k must be"),
        (dict(w=w[..., :1]), "w must be"),
        (dict(kp=pos[:, :4]), "k_positions must be"),
        (dict(qp=pos.astype(np.float32)), "q_positions must be integer"),
        (dict(k_valid=np.ones((1, 8, 8), bool)), "k_valid must be"),
        (dict(q_segment_ids=pos), "both q_segment_ids and k_segment_ids"),
        (dict(block_k=12), "block_k must be a power of two"),
    ]
    for change, message in cases:
        a = dict(q=q, k=k, w=w, qp=pos, kp=pos, impl="xla")
        a.update(change)
        extra = {n: a.pop(n) for n in ("k_valid", "q_segment_ids", "block_k") if n in a}
        with pytest.raises(ValueError, match=message):
            kt.select(a["q"], a["k"], a["w"], a["qp"], a["kp"], CFG, impl=a["impl"], **extra)


# --- HI gather path -----------------------------------------------------------------------------------------
# Big enough that the gather path really differs from scoring every key: 32 blocks of 8 keys, 3 chosen, so a
# row at p >= K = 32 scores at most 24 keys of up to 255 and places its 18 forced keys unscored.
HI_CFG = Config.tiny(index_topk=32, index_local_tokens=16, index_init_tokens=2, hi_block_size=8,
                     hi_top_blocks=3, hi_min_len=64)


def packed_rows(T, pieces):
    """Segment ids (1, 2, ... per piece length in `pieces`, 0 = padding after) and positions restarting per
    piece, as longcat_jax.training.data packs training rows."""
    seg = np.zeros((len(pieces), T), np.int32)
    for row, lengths in enumerate(pieces):
        seg[row, : sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    new_piece = np.diff(seg, axis=1, prepend=-1) != 0
    starts = np.maximum.accumulate(np.where(new_piece, np.arange(T), 0), axis=1)
    return jnp.asarray(seg), jnp.asarray(np.where(seg > 0, np.arange(T) - starts, 0), jnp.int32)


def row_plan(qp, kp, cfg, k_valid=None, q_seg=None, k_seg=None):
    """needs_full [B, T] of the HI row plan: rows the gather path cannot take."""
    k_ok = jnp.ones(kp.shape, bool) if k_valid is None else k_valid
    q_seg = jnp.zeros(qp.shape, jnp.int32) if q_seg is None else q_seg
    k_seg = jnp.zeros(kp.shape, jnp.int32) if k_seg is None else k_seg
    return np.asarray(kt._row_plan(kt._key_index(kp, k_ok, k_seg), qp, q_seg, cfg)[2])


def test_block_keys_is_the_mean_of_each_blocks_valid_keys():
    """block_keys against an explicit loop: per block of Bh positions, the mean and the count of the valid
    keys whose position falls in it; an empty block has mean 0 and count 0, and a position outside
    [0, NB * Bh) (NB = ceil(S / Bh)) counts in no block. Dyadic inputs make every sum exact."""
    rng = np.random.default_rng(10)
    B, S, J, Bh = 2, 45, 8, 4
    nb = -(-S // Bh)  # 12 blocks; the last, [44, 48), reaches past S
    # Row 0: unordered positions -6..38, the negative ones in no block (-6 // 4 = -2 must not wrap around to
    # the last block). Row 1: 6..50, so block 0 is empty, 45..47 land in the last block and 48..50 in none.
    kp = np.stack([rng.permutation(S) - 6, np.arange(S) + 6])
    k_valid = rng.random((B, S)) < 0.8
    k = rng.integers(-64, 64, (B, S, J)) / 8

    def loop(valid):
        k_sum, count = np.zeros((B, nb, J)), np.zeros((B, nb), np.int64)
        for b in range(B):
            for s in range(S):
                if valid[b, s] and 0 <= kp[b, s] < nb * Bh:
                    k_sum[b, kp[b, s] // Bh] += k[b, s]
                    count[b, kp[b, s] // Bh] += 1
        return k_sum / np.maximum(count, 1)[..., None], count

    for valid in (None, k_valid):
        bar, count = block_keys(jnp.asarray(k, jnp.float32), jnp.asarray(kp, jnp.int32), Bh,
                                None if valid is None else jnp.asarray(valid))
        want_bar, want_count = loop(np.ones((B, S), bool) if valid is None else valid)
        assert bar.shape == (B, nb, J) and bar.dtype == jnp.float32 and count.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(count), want_count)
        np.testing.assert_allclose(np.asarray(bar), want_bar, rtol=1e-6, atol=0)
    # The cases the loop must see: an empty block, a block of several keys, keys counted nowhere.
    assert (want_count == 0).any() and (want_count > 1).any() and want_count.sum() < k_valid.sum()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("si", [True, False])
def test_hi_gather_matches_reference(impl, si):
    """S = T = 256: every query block past K takes the gather path (no full-row fallback), and HI changes
    the selection, so the equality covers the gathered runs, the unscored forced set and the prefix rows."""
    cfg = dataclasses.replace(HI_CFG, si_enabled=si)
    B, T = 2, 256
    q, k, w = inputs(12, B, T, T)
    pos = arange_positions(B, T)
    assert not row_plan(pos, pos, cfg).any()
    ref = check(impl, q, k, w, pos, pos, cfg, block_q=32, block_k=32)
    assert (reference(q, k, w, pos, pos, dataclasses.replace(cfg, hi_enabled=False)) != ref).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_k_valid", [True, False])
def test_hi_packed_documents(impl, with_k_valid):
    """Packed training rows at S = 256 (positions restart per document). Without k_valid, as the model calls
    it, the padding repeats position 0 in segment 0: those rows take the full-row path, the others gather."""
    T = 256
    seg, pos = packed_rows(T, [[100, 130], [40, 216], [256]])
    q, k, w = inputs(13, 3, T, T)
    k_valid = seg > 0 if with_k_valid else None
    needs_full = row_plan(pos, pos, HI_CFG, k_valid, seg, seg)
    np.testing.assert_array_equal(needs_full, ~with_k_valid & (np.asarray(seg) == 0))
    ref = check(impl, q, k, w, pos, pos, HI_CFG, k_valid=k_valid, q_seg=seg, k_seg=seg, block_q=32,
                block_k=32)
    picks = ref[1, 40:]
    assert ((picks == -1) | (picks >= 40)).all()  # document 2 never reaches into document 1


@pytest.mark.parametrize("impl", IMPLS)
def test_hi_keys_from_cache(impl):
    """Chunked prefill against a 256-slot cache: queries at cache_len + arange(16), unwritten slots
    invalid."""
    B, S, T = 2, 256, 16
    cache_len = np.array([200, 121], np.int32)
    q, k, w = inputs(14, B, T, S)
    qp, kp = arange_positions(B, T, cache_len), arange_positions(B, S)
    k_valid = jnp.asarray(np.arange(S)[None, :] < (cache_len + T)[:, None])
    assert not row_plan(qp, kp, HI_CFG, k_valid).any()
    check(impl, q, k, w, qp, kp, HI_CFG, k_valid=k_valid, block_q=8, block_k=32)


@pytest.mark.parametrize("impl", IMPLS)
def test_hi_rows_needing_the_full_row(impl):
    """Holes in k_valid: rows at p >= K with at most K valid keys (dense) or an invalid key in their window
    take the full-row path; the other rows gather, and all match."""
    B, T = 2, 256
    q, k, w = inputs(15, B, T, T)
    pos = arange_positions(B, T)
    holes = np.ones((B, T), bool)
    holes[0, 20:230] = False  # rows 32..241 hold at most 32 valid keys, rows up to 244 see the hole
    holes[1, 100] = False  # in the window of rows 100..115
    needs_full = row_plan(pos, pos, HI_CFG, jnp.asarray(holes))
    assert needs_full[0, 32:245].all() and not needs_full[0, 245:].any()
    assert needs_full[1, 100:116].all() and not needs_full[1, 116:].any()
    check(impl, q, k, w, pos, pos, HI_CFG, k_valid=jnp.asarray(holes), block_q=32, block_k=32)


def test_hi_pallas_skips_tiles():
    """Scores grow with the key position, so every row chooses its latest candidate blocks: a query block
    past K needs only the tile of the sinks and the few tiles around its rows, and the kernel (which visits
    only the planned tiles) still matches the reference."""
    B, T, bq, bk, J = 1, 256, 8, 16, 16
    rng = np.random.default_rng(17)
    direction = np.abs(rng.standard_normal(J)).astype(np.float32)
    k = (np.arange(T)[:, None] / T + 0.1) * direction + 0.01 * rng.standard_normal((T, J))
    q = np.abs(rng.standard_normal((B, T, 2, J))).astype(np.float32)
    q, k, w = jnp.asarray(q), jnp.asarray(k[None], jnp.float32), jnp.ones((B, T, 2), jnp.float32)
    pos = arange_positions(B, T)
    ones, zeros = jnp.ones((B, T), bool), jnp.zeros((B, T), jnp.int32)
    index = kt._key_index(pos, ones, zeros)
    k_bar, count = block_keys(k, pos, HI_CFG.hi_block_size)
    hier = kt._Hier(k_bar, count, index, *kt._row_plan(index, pos, zeros, HI_CFG))
    dense = hier.n_valid <= HI_CFG.index_topk
    _, need = _hi_tile_plan(q, w, pos, ones, dense, pos, ones, hier, HI_CFG, bq, bk)
    need = np.asarray(need[0, 8:])  # query blocks 8.. (every row at p >= K = 32), 5..16 reachable tiles
    reachable = np.arange(T // bk)[None, :] * bk <= (np.arange(8, T // bq) * bq + bq - 1)[:, None]
    assert need[:, 0].all() and not (need & ~reachable).any()
    assert need.sum(-1).max() <= 5 and reachable.sum(-1).max() == T // bk  # sinks, chosen blocks, window
    check("pallas", q, k, w, pos, pos, HI_CFG, block_q=bq, block_k=bk)


def test_hi_xla_scores_no_full_rows():
    """The gather branch of the HI xla path holds no [.., bq, .., S] array: its work does not grow with S.
    The full-row branch (its fallback) does, which shows the check can fail."""
    B, T, bq = 1, 256, 16
    q, k, w = inputs(16, B, T, T, J=8)
    pos = arange_positions(B, T)
    jaxpr = jax.make_jaxpr(lambda q, k, w, p: kt.select(q, k, w, p, p, HI_CFG, impl="xla", block_q=bq))(
        q, k, w, pos)

    def has_rows_by_keys(jaxpr):
        shapes = (v.aval.shape for e in _all_eqns(jaxpr) for v in e.outvars if hasattr(v.aval, "shape"))
        return any(bq in shape and T in shape for shape in shapes)

    conds = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "cond"]
    assert len(conds) == 1
    assert sorted(has_rows_by_keys(branch.jaxpr) for branch in conds[0].params["branches"]) == [False, True]


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (map, cond branches, loops)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _all_eqns(sub)


def without_window(ref, qp, kp, q_seg, k_seg, local):
    """The full selection with each row's local-window keys removed (order kept), -1 padded to K - local."""
    K = ref.shape[-1]
    out = np.full(ref.shape[:-1] + (K - local,), -1, np.int32)
    for b, t in np.ndindex(*ref.shape[:2]):
        row = ref[b, t][ref[b, t] >= 0]
        keep = [s for s in row if not (kp[b, s] > qp[b, t] - local and k_seg[b, s] == q_seg[b, t])]
        out[b, t, : len(keep)] = keep
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_window_apart_is_the_selection_without_its_window(impl):
    """window_apart=True gives exactly the full selection minus the SI window slots, order kept: HI off and
    on (gather path), packed documents, keys from a cache."""
    T = 256
    seg, pos = packed_rows(T, [[100, 130], [40, 216]])
    q_c, k_c, w_c = inputs(17, 2, 16, 64)
    cache_qp, cache_kp = arange_positions(2, 16, [40, 30]), arange_positions(2, 64)
    cache_valid = jnp.asarray(np.arange(64)[None] < np.array([[56], [46]]))
    cases = [  # (cfg, q, k, w, qp, kp, k_valid, segments)
        (CFG, *inputs(16, 2, 37, 37), arange_positions(2, 37), arange_positions(2, 37), None, None),
        (HI_CFG, *inputs(13, 2, T, T), pos, pos, seg > 0, seg),
        (CFG, q_c, k_c, w_c, cache_qp, cache_kp, cache_valid, None),
    ]
    for cfg, q, k, w, qp, kp, k_valid, seg_ids in cases:
        full = reference(q, k, w, qp, kp, cfg, k_valid, seg_ids, seg_ids)
        out = kt.select(q, k, w, qp, kp, cfg, k_valid=k_valid, q_segment_ids=seg_ids, k_segment_ids=seg_ids,
                        window_apart=True, impl=impl, block_q=16, block_k=32)
        zeros_q, zeros_k = np.zeros(qp.shape, np.int32), np.zeros(kp.shape, np.int32)
        segs = (zeros_q, zeros_k) if seg_ids is None else (np.asarray(seg_ids),) * 2
        expected = without_window(full, np.asarray(qp), np.asarray(kp), *segs, cfg.index_local_tokens)
        np.testing.assert_array_equal(np.asarray(out), expected)
        assert (expected >= 0).sum() < (full >= 0).sum()  # windows really were removed
        # si_window.window_indices supplies exactly the removed keys: together they are the full selection.
        q_offset = np.asarray(qp)[:, 0]  # positions are key rows in every case here
        window = window_indices(qp, kp, cfg.index_local_tokens, q_offset, k_valid=k_valid,
                                q_segment_ids=seg_ids, k_segment_ids=seg_ids)
        both = np.concatenate([np.asarray(window), expected], axis=-1)
        np.testing.assert_array_equal(np.sort(np.where(both < 0, 1 << 30, both))[..., : full.shape[-1]],
                                      np.sort(np.where(full < 0, 1 << 30, full)))
    with pytest.raises(ValueError, match="window_apart needs SI"):
        kt.select(q, k, w, qp, kp, dataclasses.replace(CFG, si_enabled=False), window_apart=True)
