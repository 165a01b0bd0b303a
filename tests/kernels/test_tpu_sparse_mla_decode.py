"""Sparse MLA paged decode, Mosaic kernel (pallas_kernels/tpu_sparse_mla_decode.py): it lowers for TPU, and
under the TPU interpreter it equals the reference over the pages laid out as linear rows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.config import Config
from pallas_kernels import tpu_sparse_mla_decode
from pallas_kernels.sparse_mla_decode import sparse_mla_decode_paged
from pallas_kernels.tpu_sparse_mla_decode import tpu_sparse_mla_decode_paged
from tests.kernels.tpu_cases import TPU_CALL, assert_close, lower_for_tpu, normal, paged_case, paged_reference

# 2 sequences, 4 heads, R + Hr = 24; 11 physical pages of 4 rows, 4 per sequence; K = 20 slots in chunks of 8:
# three chunks, so both DMA buffers are refilled while the other one is read.
B, N, R, Hr, PAGE, PAGES_PER_SEQ, NUM_PAGES, K = 2, 4, 16, 8, 4, 4, 11, 20
LENGTHS = (13, 16)
SCALE = 0.3


@functools.partial(jax.jit, static_argnames=("block_k",))
def decode(q_lat, q_rope, kv_pages, page_table, idx, new_rows=None, new_pos=None, *, block_k=8):
    return tpu_sparse_mla_decode_paged(q_lat, q_rope, kv_pages, page_table, idx, SCALE, new_rows=new_rows,
                                       new_pos=new_pos, block_k=block_k)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_equals_reference_with_new_row_apart(dtype):
    rng = np.random.default_rng(9)
    case = paged_case(rng, B, N, R, Hr, PAGE, PAGES_PER_SEQ, NUM_PAGES, K, LENGTHS, dtype)
    q_lat, q_rope, kv_pages, page_table, idx = case
    idx = idx.at[1, 5:].set(-1)  # a sequence with mostly empty slots: one chunk holds no valid slot
    new_rows = normal(rng, (B, R + Hr), dtype=dtype)[0]
    new_pos = jnp.asarray([LENGTHS[0] - 1, 0], jnp.int32)  # selected: the last and the first position
    o = decode(q_lat, q_rope, kv_pages, page_table, idx, new_rows, new_pos)
    o_ref = paged_reference(q_lat, q_rope, kv_pages, page_table, idx, SCALE, new_rows, new_pos)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert o.dtype == dtype and o.shape == (B, N, R)
    assert_close(o, o_ref, tol)
    # The same as the XLA path of the public entry point, and the new rows did change the result.
    assert_close(o, sparse_mla_decode_paged(*case[:4], idx, SCALE, new_rows=new_rows, new_pos=new_pos,
                                            impl="xla"), tol)
    without = paged_reference(q_lat, q_rope, kv_pages, page_table, idx, SCALE)
    assert not np.allclose(np.asarray(o, np.float32), np.asarray(without), atol=1e-2)


def test_no_valid_slot_gives_zeros_and_block_k_does_not_matter():
    rng = np.random.default_rng(3)
    q_lat, q_rope, kv_pages, page_table, idx = paged_case(rng, B, N, R, Hr, PAGE, PAGES_PER_SEQ, NUM_PAGES, K,
                                                          LENGTHS)
    idx = idx.at[0].set(-1).at[1, 0].set(PAGE * PAGES_PER_SEQ)  # none at all; one past the page table
    o8 = decode(q_lat, q_rope, kv_pages, page_table, idx)
    o32 = decode(q_lat, q_rope, kv_pages, page_table, idx, block_k=32)  # one chunk
    assert np.all(np.asarray(o8[0]) == 0)
    assert_close(o8, paged_reference(q_lat, q_rope, kv_pages, page_table, idx, SCALE), 1e-5)
    assert_close(o32, o8, 1e-6)


def test_a_broken_dma_row_fails(monkeypatch):
    """The interpreter checks the DMAs: a row number past the cache raises, a shifted one gives wrong rows."""
    rng = np.random.default_rng(4)
    case = paged_case(rng, 1, N, R, Hr, PAGE, PAGES_PER_SEQ, NUM_PAGES, 8, LENGTHS[:1])
    run = functools.partial(tpu_sparse_mla_decode_paged, scale=SCALE, block_k=8)
    monkeypatch.setattr(tpu_sparse_mla_decode, "safe_row", lambda row, num_rows: row + num_rows)
    with pytest.raises(Exception, match="[Oo]ut-of-bounds"):
        jax.block_until_ready(run(*case))
    monkeypatch.setattr(tpu_sparse_mla_decode, "safe_row", lambda row, num_rows: (row + 1) % num_rows)
    assert not np.allclose(np.asarray(run(*case)), np.asarray(paged_reference(*case, SCALE)), atol=1e-3)


def test_lowers_for_tpu_at_small_preset_shapes():
    cfg = Config.small()
    rng = np.random.default_rng(0)
    Bs, T, page = 2, 512, 64
    q_lat, q_rope, kv_pages = normal(rng, (Bs, cfg.num_heads, cfg.kv_lora_rank),
                                     (Bs, cfg.num_heads, cfg.qk_rope_head_dim),
                                     (Bs * T // page, page, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                                     dtype=jnp.bfloat16)
    page_table = jnp.asarray(rng.permutation(Bs * T // page).reshape(Bs, T // page), jnp.int32)
    idx = jnp.asarray(rng.integers(-1, T, (Bs, cfg.index_topk)), jnp.int32)
    new_rows, new_pos = kv_pages[:Bs, 0], jnp.asarray([T - 1, 7], jnp.int32)

    def step(q_lat, q_rope, kv_pages):
        return tpu_sparse_mla_decode_paged(q_lat, q_rope, kv_pages, page_table, idx, 0.1, new_rows=new_rows,
                                           new_pos=new_pos)

    text = lower_for_tpu(step, (q_lat, q_rope, kv_pages))
    assert text.count(TPU_CALL) == 1

    def public(q_lat, q_rope, kv_pages):  # the entry point the engine calls picks the Mosaic kernel on TPU
        return sparse_mla_decode_paged(q_lat, q_rope, kv_pages, page_table, idx, 0.1, new_rows=new_rows,
                                       new_pos=new_pos, impl="pallas")

    assert lower_for_tpu(public, (q_lat, q_rope, kv_pages)).count(TPU_CALL) == 1
