"""The paged cache's selection rule (model/paged_cache.select): the fused kernel and the reference choose the
same keys, and HI follows each sequence's own length, so a sequence's selection does not depend on the
page-table width its batch was compiled for."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.config import Config
from longcat_jax.model import indexer as ix
from longcat_jax.model import paged_cache

CFG = Config.tiny(hi_min_len=20)  # K = 16, SI init 2 / local 4, HI blocks of 4 once a sequence passes 20 keys


def decode_inputs(lengths, S, seed=0):
    """One new query per sequence at position length - 1, over S gathered key rows, `length` of them real."""
    rng = np.random.default_rng(seed)
    B = len(lengths)
    shapes = ((B, 1, 2, 16), (B, S, 16), (B, 1, 2))
    q, k, w = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)
    lengths = jnp.asarray(lengths, jnp.int32)
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return q, k, w, (lengths - 1)[:, None], k_pos, k_pos < lengths[:, None], lengths


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_hi_by_each_sequence_length(impl):
    cfg = dataclasses.replace(CFG, kernel_impl=impl)
    q, k, w, q_pos, k_pos, valid, lengths = decode_inputs([18, 40], S=64)
    got = paged_cache.select(q, k, w, q_pos, k_pos, cfg, valid, lengths)
    flat = dataclasses.replace(CFG, hi_enabled=False)
    # The short sequence is chosen as without HI, the long one with it, each as if it were alone
    short = ix.select(q[:1], k[:1, :18], w[:1], q_pos[:1], k_pos[:1, :18], flat)
    long = ix.select(q[1:], k[1:, :40], w[1:], q_pos[1:], k_pos[1:, :40], CFG)
    np.testing.assert_array_equal(got[0], short[0])
    np.testing.assert_array_equal(got[1], long[0])
    long_flat = ix.select(q[1:], k[1:, :40], w[1:], q_pos[1:], k_pos[1:, :40], flat)
    assert not np.array_equal(long[0], long_flat[0])  # HI matters for this sequence
    # a wider page table (more unwritten rows) changes nothing
    wide = paged_cache.select(q, jnp.pad(k, ((0, 0), (0, 64), (0, 0))), w, q_pos,
                              jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (2, 128)), cfg,
                              jnp.pad(valid, ((0, 0), (0, 64))), lengths)
    np.testing.assert_array_equal(wide, got)


def test_fused_decode_selection_equals_reference():
    """paged_cache.select ranks a decode step's [1, S] scores by the reference rule on XLA; the fused kernel
    path (what a GPU or TPU takes) must choose the same keys."""
    from pallas_kernels import indexer_topk

    cfg = dataclasses.replace(CFG, hi_enabled=False, kernel_impl="xla")
    q, k, w, q_pos, k_pos, valid, _ = decode_inputs([18, 40], S=48, seed=1)
    fused = indexer_topk.select(q, k, w, q_pos, k_pos, cfg, k_valid=valid, impl="xla")
    ref = ix.select(q, k, w, q_pos, k_pos, cfg, valid)
    np.testing.assert_array_equal(np.sort(fused, -1), np.sort(ref, -1))


def test_unrolled_step_equals_the_scan_and_writes_the_pool_in_place():
    """jit_paged_step's per-layer, per-expert form (CPU default) gives the scan's logits and cache, both equal
    the plain model's paged_step (jit_paged_step serves a copy holding W_UK and W_UV split out of w_kv_up, and
    leaves the model itself alone), XLA updates the donated pool in place (no copy of the whole pool, see the
    write-after-read note in paged_step), and the expert loop reads per-expert weights in place."""
    import jax

    import longcat_jax as lj
    from longcat_jax.model.longcat import jit_paged_step, paged_step
    from longcat_jax.model.paged_cache import init_paged_cache

    model = lj.build_model(Config.tiny(vocab_size=384), seed=0)
    args = (jnp.asarray([[5, 6, 7, 0], [9, 3, 0, 0]], jnp.int32), jnp.asarray([0, 4], jnp.int32),
            jnp.asarray([3, 2], jnp.int32), jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32))
    H = model.cfg.ngram_n - 1
    history = jnp.zeros((2, H), jnp.int32)

    def filled_cache():
        cache = init_paged_cache(model.cfg, 8, 4)
        return cache.replace(kv=cache.kv + 0.01)  # rows 4.. of sequence 1 are its cached prefix

    outs = [jax.device_get(jax.jit(paged_step)(model, *args, filled_cache(), history))]
    for unroll in (False, True):
        step, params = jit_paged_step(model, unroll)
        cache = filled_cache()
        text = step.lower(params, *args, cache, history).compile().as_text()
        if unroll:
            pool = "f32[{}]".format(",".join(map(str, cache.kv.shape)))
            assert not [line for line in text.splitlines() if f"{pool}" in line and " copy(" in line]
        # Per-expert arrays: the expert loop's matmuls read them in place; sliced out of a stacked array,
        # each tile copies its expert's weights first.
        D, F = model.cfg.hidden_size, model.cfg.expert_ffn_hidden_size
        weight = re.compile(rf"= f32\[({D},{F}|{F},{D})\]\{{1,0\}} (fusion|slice|copy|dynamic-slice)\(")
        copies = [line for line in text.splitlines() if "moe/" in line and weight.search(line)]
        assert bool(copies) != unroll, copies[:3]
        outs.append(jax.device_get(step(params, *args, cache, history)))
    assert not hasattr(model.layers.attn0, "w_uk")
    for other in outs[1:]:
        np.testing.assert_allclose(outs[0][0], other[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs[0][1].kv, other[1].kv, rtol=1e-5, atol=1e-5)
