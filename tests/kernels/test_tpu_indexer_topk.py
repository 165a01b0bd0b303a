"""Indexer top-k, Mosaic kernel (pallas_kernels/tpu_indexer_topk.py, tpu_bitonic.py), through
`indexer_topk.select(impl="pallas")` on a simulated TPU: it lowers for TPU (plain, window apart, HI), and
under the TPU interpreter its int32 indices equal the reference's exactly, slot order and -1 slots
included, over several key tiles (bk = 128: the buffer merge runs per tile), for SI with keys from a cache,
exact ties in bf16 without SI, packed documents with the window kept apart, and HI with packed documents
and dense rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.gpu_cases import kernel_cases
from longcat_jax.config import Config
from pallas_kernels import impl, tpu_indexer_topk
from pallas_kernels import indexer_topk as kt
from tests.kernels.test_indexer_topk import (
    CFG,
    HI_CFG,
    arange_positions,
    inputs,
    packed_rows,
    reference,
    row_plan,
    without_window,
)
from tests.kernels.tpu_cases import TPU_CALL, lower_for_tpu


def tpu_select(q, k, w, qp, kp, cfg, **kw):
    with impl.interpreting("tpu"):
        return np.asarray(kt.select(q, k, w, qp, kp, cfg, impl="pallas", **kw))


def check(q, k, w, qp, kp, cfg, k_valid=None, seg=None):
    """The Mosaic kernel's indices equal the reference's exactly; returns them."""
    ref = reference(q, k, w, qp, kp, cfg, k_valid, seg, seg)
    out = tpu_select(q, k, w, qp, kp, cfg, k_valid=k_valid, q_segment_ids=seg, k_segment_ids=seg)
    assert out.dtype == np.int32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)
    return ref


@pytest.mark.parametrize("name", ["indexer_topk", "indexer_topk_window_apart", "indexer_topk_hi"])
def test_lowers_for_tpu_at_small_preset_shapes(name):
    fn, args, n_kernels = kernel_cases(Config.small(), T=256)[name]
    assert lower_for_tpu(fn, args).count(TPU_CALL) == n_kernels == 1


def test_the_triton_kernel_does_not_lower_for_tpu(monkeypatch):
    """The lowering check has teeth: routed to the Triton kernel (1-D per-query blocks, the whole key row as
    one block), the same call breaks Mosaic's tiling rule."""
    fn, args, _ = kernel_cases(Config.small(), T=64)["indexer_topk"]
    monkeypatch.setattr(kt, "backend", lambda: "triton")
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower_for_tpu(fn, args)


def test_si_keys_from_cache_over_several_tiles(monkeypatch):
    """3 queries (padded to a block of 8) against 300 cache slots (3 key tiles), unwritten slots invalid:
    the entry point runs the Mosaic kernel, rows hold sinks, window and dynamic keys from every tile."""
    calls, kernel = [], tpu_indexer_topk.tpu_select
    monkeypatch.setattr(tpu_indexer_topk, "tpu_select", lambda *a: calls.append(a) or kernel(*a))
    B, T, S = 2, 3, 300
    cache_len = np.array([280, 190], np.int32)
    q, k, w = inputs(20, B, T, S)
    qp, kp = arange_positions(B, T, cache_len), arange_positions(B, S)
    k_valid = jnp.asarray(np.arange(S)[None, :] < (cache_len + T)[:, None])
    ref = check(q, k, w, qp, kp, CFG, k_valid=k_valid)
    assert calls, "select(impl='pallas') on TPU must run the Mosaic kernel"
    assert (ref >= 0).all() and (ref[0] >= 256).any() and (ref[0] < 128).any() and (ref[1] >= 128).any()


def test_exact_ties_in_bf16_without_si():
    """Small-integer bf16 q, k, w and few distinct keys: exact scores that tie massively, so the K boundary
    and the slot order rest on lax.top_k's rule, inside a tile and across the two tiles; early rows have -1
    slots."""
    cfg = dataclasses.replace(CFG, si_enabled=False, hi_enabled=False)
    B, T, I, J = 2, 140, 2, 16
    rng = np.random.default_rng(7)
    q = rng.integers(-2, 3, (B, T, I, J)).astype(np.float32)
    w = rng.integers(-1, 3, (B, T, I)).astype(np.float32)
    # 3 distinct keys in the first tile, 5 in the second: ties within and across tiles, some won late.
    which = np.concatenate([rng.integers(0, 3, 128), rng.integers(0, 5, T - 128)])
    k = rng.integers(-2, 3, (B, 5, J)).astype(np.float32)[:, which]
    pos = arange_positions(B, T)
    ref = check(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, w)), pos, pos, cfg)
    scores = np.einsum("bti,btis->bts", w, np.maximum(np.einsum("btij,bsj->btis", q, k), 0))
    picked = np.take_along_axis(scores, np.maximum(ref, 0), axis=-1)
    ties = (picked[..., 1:] == picked[..., :-1]) & (ref[..., 1:] >= 0) & (ref[..., :-1] >= 0)
    assert ties.any() and (ref == -1).any() and (ref >= 128).any()


def test_packed_documents_with_the_window_apart():
    """Packed rows (segment ids, positions restarting per document, padding invalid) with window_apart: the
    full selection minus each row's SI window, order kept, K - local slots."""
    T = 160
    seg, pos = packed_rows(T, [[60, 90], [20, 140]])
    q, k, w = inputs(21, 2, T, T)
    k_valid = seg > 0
    full = reference(q, k, w, pos, pos, CFG, k_valid, seg, seg)
    out = tpu_select(q, k, w, pos, pos, CFG, k_valid=k_valid, q_segment_ids=seg, k_segment_ids=seg,
                     window_apart=True)
    segs = np.asarray(seg)
    expected = without_window(full, np.asarray(pos), np.asarray(pos), segs, segs, CFG.index_local_tokens)
    assert out.shape[-1] == CFG.index_topk - CFG.index_local_tokens
    np.testing.assert_array_equal(out, expected)
    assert (expected >= 0).sum() < (full >= 0).sum()  # windows really were removed
    assert ((out[1, 20:] == -1) | (out[1, 20:] >= 20)).all()  # document 2 never reaches into document 1


def test_hi_packed_documents_and_dense_rows():
    """HI at S = 256 (32 blocks of 8, 3 chosen): row 0 packed documents, row 1 a hole in k_valid that leaves
    rows at p >= K with at most K valid keys (dense: every valid key competes). HI changes the selection."""
    T = 256
    seg, pos = packed_rows(T, [[100, 130], [256]])
    holes = np.ones((2, T), bool)
    holes[1, 20:230] = False
    k_valid = jnp.asarray(np.asarray(seg > 0) & holes)
    q, k, w = inputs(22, 2, T, T)
    assert row_plan(pos, pos, HI_CFG, k_valid, seg, seg)[1, 32:240].all()  # the dense rows
    ref = check(q, k, w, pos, pos, HI_CFG, k_valid=k_valid, seg=seg)
    flat = reference(q, k, w, pos, pos, dataclasses.replace(HI_CFG, hi_enabled=False), k_valid, seg, seg)
    assert (flat != ref).any()


def test_lane_bitonic_sort_both_directions():
    """tpu_bitonic.sort on [8, 256] rows with many equal keys: key descending, equal keys by id ascending (as
    np.lexsort orders them), or the exact reverse of that order; it also lowers for TPU."""
    from jax.experimental import pallas as pl

    from pallas_kernels import tpu_bitonic

    def kernel(k_ref, i_ref, *out_refs):
        for d, descending in enumerate((True, False)):
            keys, ids = tpu_bitonic.sort(k_ref[...], i_ref[...], descending)
            out_refs[2 * d][...], out_refs[2 * d + 1][...] = keys, ids

    def call(keys, ids):
        return pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct(keys.shape, jnp.int32)] * 4,
                              interpret=impl.tpu_interpret())(keys, ids)

    rng = np.random.default_rng(3)
    keys = rng.integers(-4, 4, (8, 256)).astype(np.int32)
    ids = np.stack([rng.permutation(256) for _ in range(8)]).astype(np.int32)
    outs = [np.asarray(x) for x in call(jnp.asarray(keys), jnp.asarray(ids))]
    first_to_last = np.lexsort((ids, -keys), axis=-1)
    for d, order in enumerate((first_to_last, first_to_last[:, ::-1])):
        np.testing.assert_array_equal(outs[2 * d], np.take_along_axis(keys, order, -1))
        np.testing.assert_array_equal(outs[2 * d + 1], np.take_along_axis(ids, order, -1))
    assert lower_for_tpu(call, (jnp.asarray(keys), jnp.asarray(ids))).count(TPU_CALL) == 1
