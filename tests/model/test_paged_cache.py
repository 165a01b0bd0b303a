"""The paged cache's selection rule (model/paged_cache.select): the fused kernel and the reference choose the
same keys, and HI follows each sequence's own length, so a sequence's selection does not depend on the
page-table width its batch was compiled for."""

import dataclasses

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
