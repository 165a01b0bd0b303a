"""Sparse MLA decode over a paged latent cache (docs/architecture.md#sparse-attention):
one new query per sequence.

The one-query form of `sparse_mla.sparse_mla`: it reads only the selected latent rows, through the page table,
with the same online softmax (inference only, no gradient). The XLA path gathers the rows and attends at once;
the Pallas kernel streams them block_k slots at a time.

Reference: `pallas_kernels.sparse_mla.sparse_mla_reference` over the pages gathered into linear rows, with
one query per sequence.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.impl import backend, resolve
from pallas_kernels.sparse_mla import (
    _attend_rows,
    _online_softmax,
    _pad,
    _query_grid_call,
    _slot_block,
    _valid,
)
from pallas_kernels.tpu_sparse_mla_decode import tpu_sparse_mla_decode_paged


def _decode_kernel(idx_ref, ql_ref, qr_ref, table_ref, new_pos_ref, new_row_ref, kv_ref, o_ref, *, scale,
                   block_k, page_size):
    R, Hr = ql_ref.shape[-1], qr_ref.shape[-1]

    def load_chunk(c):
        pos = idx_ref[pl.ds(c * block_k, block_k)]
        valid = _valid(pos, table_ref.shape[0] * page_size)
        new = (pos == new_pos_ref[0])[:, None]  # the new token's own row is not in the pages yet
        pos = jnp.where(valid, pos, 0)
        rows = table_ref[pos // page_size] * page_size + pos % page_size
        return (valid, jnp.where(new, new_row_ref[pl.ds(0, R)][None, :], kv_ref[rows, pl.ds(0, R)]),
                jnp.where(new, new_row_ref[pl.ds(R, Hr)][None, :], kv_ref[rows, pl.ds(R, Hr)]))

    o_ref[...], _ = _online_softmax(load_chunk, ql_ref[...], qr_ref[...], idx_ref.shape[0] // block_k, scale)


def sparse_mla_decode_paged(q_lat, q_rope, kv_pages, page_table, indices, scale, *, new_rows=None,
                            new_pos=None, impl="auto", block_k=64):
    """One decode step of sparse MLA over a paged latent cache (inference; not differentiable).

    Args:
      q_lat [B, N, R], q_rope [B, N, Hr]: the absorbed query of the new token.
      kv_pages [P, page_size, R + Hr]: latent rows c_kv | k_rope; logical position p of sequence b lives in
        page page_table[b, p // page_size], row p % page_size.
      page_table int [B, pages_per_seq]; indices int [B, K]: selected logical positions, -1 = empty slot.
      scale: the softmax scale (a Python float).
      new_rows [B, R + Hr], new_pos int [B]: the new token's own row, at position new_pos, when it is not
        written to the pages yet (the engine writes every layer's rows after the step, so that the pages are
        only read while the layers run); a selected slot at new_pos reads it instead of its page.
    Returns o_lat [B, N, R] in q_lat's dtype (zeros for a sequence with no valid slot).
    """
    impl = resolve(impl)
    B, N, R = q_lat.shape if q_lat.ndim == 3 else (None,) * 3
    Hr, D = q_rope.shape[-1], kv_pages.shape[-1]
    if B is None or q_rope.shape[:2] != (B, N) or kv_pages.ndim != 3 or D != R + Hr:
        raise ValueError(
            f"want q_lat [B,N,R], q_rope [B,N,Hr], kv_pages [P,page,R+Hr]: got {q_lat.shape}, "
            f"{q_rope.shape}, {kv_pages.shape}"
        )
    if page_table.ndim != 2 or page_table.shape[0] != B or indices.ndim != 2 or indices.shape[0] != B:
        raise ValueError(
            f"want page_table [B={B},pages], indices [B={B},K]: got {page_table.shape}, {indices.shape}"
        )
    if impl == "pallas" and backend() == "mosaic":  # TPU: the Mosaic kernel (tpu_sparse_mla_decode.py)
        return tpu_sparse_mla_decode_paged(q_lat, q_rope, kv_pages, page_table, indices, scale,
                                           new_rows=new_rows, new_pos=new_pos)
    page_size = kv_pages.shape[1]
    kv_rows = kv_pages.reshape(-1, D)  # contiguous: a free view, no copy of the cache
    page_table, indices, scale = page_table.astype(jnp.int32), indices.astype(jnp.int32), float(scale)
    if new_rows is None:  # no row to substitute: position -1 is never selected
        new_rows, new_pos = jnp.zeros((B, D), kv_pages.dtype), jnp.full((B,), -1, jnp.int32)
    new_rows, new_pos = new_rows.astype(kv_pages.dtype), new_pos.astype(jnp.int32)
    if impl == "xla":
        valid = _valid(indices, page_table.shape[1] * page_size)
        pos = jnp.where(valid, indices, 0)
        selected = kv_rows[jnp.take_along_axis(page_table, pos // page_size, 1) * page_size + pos % page_size]
        selected = jnp.where((indices == new_pos[:, None])[..., None], new_rows[:, None], selected)
        o = _attend_rows(q_lat, q_rope, valid, selected[..., :R], selected[..., R:], scale)[0]
        return o.astype(q_lat.dtype)
    block_k = _slot_block(block_k, indices.shape[-1])
    indices = _pad(indices, 1, -indices.shape[-1] % block_k, -1)
    (o,) = _query_grid_call(
        functools.partial(_decode_kernel, scale=scale, block_k=block_k, page_size=page_size),
        [(indices[:, None], 2), (q_lat[:, None], 2), (q_rope[:, None], 2), (page_table, 1),
         (new_pos[:, None, None], 2), (new_rows[:, None], 2), (kv_rows, 0)],
        [(B, 1, N, R)],
    )
    return o[:, 0].astype(q_lat.dtype)


__all__ = ["sparse_mla_decode_paged"]
