"""Sparse MLA decode over a paged latent cache, Mosaic (TPU) kernel (docs/architecture.md#sparse-attention).

The TPU form of `sparse_mla_decode.sparse_mla_decode_paged`, with the same contract: one new query per
sequence attends to its K selected logical positions, read through the page table, the new token's own row
taken from `new_rows` while it is not in the pages yet.

One program per sequence. The selected rows never pass through a BlockSpec: for each chunk of `block_k`
slots the kernel reads the slot's position from SMEM, looks its page up in the page table (SMEM too), and
DMAs that single row from the HBM cache into a VMEM buffer, double-buffered (`tpu_row_gather`), so the
next chunk's rows are in flight while this chunk's scores and weighted sum run on the MXU. The new token's
row is the same DMA from another source (`new_rows` in HBM): the overlay costs no vector select.

Mosaic's block rule (last two block dims divisible by 8 and 128, or whole) holds because every per-sequence
block is whole in its last two dims: q [N, R + Hr], the indices as SMEM [1, K] and as VMEM [chunks, 1,
block_k] (the lane vector that masks invalid slots), the page table row [1, pages].

Reference: `pallas_kernels.sparse_mla.sparse_mla_reference` over the pages gathered into linear rows
(tests/kernels/test_tpu_sparse_mla_decode.py), and the XLA path of `sparse_mla_decode_paged`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_mla_chunks as mc
from pallas_kernels.impl import mosaic_params, tpu_interpret
from pallas_kernels.tpu_row_gather import double_buffer_shapes, safe_row, stream_rows


def _decode_kernel(new_pos_ref, idx_smem, table_smem, idx_vmem, q_ref, kv_hbm, new_hbm, o_ref, buf, sems, *,
                   scale, page_size):
    b = pl.program_id(0)
    num_chunks, _, block_k = idx_vmem.shape
    seq_len = table_smem.shape[-1] * page_size  # logical positions a page-table row can address

    def locate(k):
        pos = idx_smem[0, k]
        ok = (pos >= 0) & (pos < seq_len)
        pos = jnp.where(ok, pos, 0)
        page = table_smem[0, jax.lax.div(pos, page_size)]
        row = safe_row(page * page_size + jax.lax.rem(pos, page_size), kv_hbm.shape[0])
        is_new = ok & (pos == new_pos_ref[b])
        return jnp.where(is_new, 1, 0), jnp.where(is_new, b, row)

    q = q_ref[...]

    def body(c, rows, state):
        valid = mc.valid_slots(idx_vmem[c], seq_len)
        return mc.online_update(state, mc.scores(q, rows, valid, scale), valid, rows)

    state = mc.init_state(*q.shape)
    state = stream_rows((kv_hbm, new_hbm), locate, buf, sems, num_chunks, body, state)
    o_ref[...] = mc.finish(state)[0]


def decode_call(q, kv_rows, new_rows, new_pos, page_table, indices, scale, page_size, block_k):
    """The pallas_call: q [B, N, W], kv_rows [rows, W], new_rows [B, W], new_pos int [B], page_table int
    [B, pages], indices int [B, Kp] (Kp a multiple of block_k) -> o [B, N, W] f32."""
    (B, N, W), Kp, pages = q.shape, indices.shape[-1], page_table.shape[-1]
    num_chunks = Kp // block_k
    whole = lambda *shape: pl.BlockSpec((None, *shape), lambda b, *_: (b,) + (0,) * len(shape))  # noqa: E731
    smem = lambda *shape: pl.BlockSpec(  # noqa: E731
        (None, *shape), lambda b, *_: (b,) + (0,) * len(shape), memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B,),
        in_specs=[smem(1, Kp), smem(1, pages), whole(num_chunks, 1, block_k), whole(N, W), hbm, hbm],
        out_specs=whole(N, W),
        scratch_shapes=double_buffer_shapes(block_k, W, kv_rows.dtype),
    )
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, page_size=page_size),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, N, W), mc.F32),
        compiler_params=mosaic_params("parallel"),
        interpret=tpu_interpret(),
    )(new_pos, indices[:, None], page_table[:, None], indices.reshape(B, num_chunks, 1, block_k), q, kv_rows,
      new_rows)


def _slot_block(block_k, K):
    # Slots per chunk: a power of two, at least 8 (a sublane tile of the row buffer), at most K rounded up.
    if block_k < 8 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 8, got {block_k}")
    return min(block_k, max(8, pl.next_power_of_2(K)))


def tpu_sparse_mla_decode_paged(q_lat, q_rope, kv_pages, page_table, indices, scale, *, new_rows=None,
                                new_pos=None, block_k=128):
    """`sparse_mla_decode.sparse_mla_decode_paged` as a Mosaic kernel (same arguments and result; inference,
    not differentiable). block_k: slots per DMA chunk (a power of two >= 8; 128 fills the MXU's lanes).

    Args:
      q_lat [B, N, R], q_rope [B, N, Hr]; kv_pages [P, page_size, R + Hr]; page_table int [B, pages];
      indices int [B, K] (-1 = empty slot); scale (a Python float); new_rows [B, R + Hr] and new_pos int [B]:
      the new token's row at position new_pos, read instead of its page.
    Returns o_lat [B, N, R] in q_lat's dtype (zeros for a sequence with no valid slot).
    """
    (B, N, R), D = q_lat.shape, kv_pages.shape[-1]
    if q_rope.shape[:2] != (B, N) or kv_pages.ndim != 3 or D != R + q_rope.shape[-1]:
        raise ValueError(f"want q_lat [B,N,R], q_rope [B,N,Hr], kv_pages [P,page,R+Hr]: got {q_lat.shape}, "
                         f"{q_rope.shape}, {kv_pages.shape}")
    if page_table.shape[0] != B or indices.shape[0] != B or page_table.ndim != 2 or indices.ndim != 2:
        raise ValueError(f"want page_table [B={B},pages], indices [B={B},K]: got {page_table.shape}, "
                         f"{indices.shape}")
    page_size = kv_pages.shape[1]
    if new_rows is None:  # no row to substitute: position -1 is never selected
        new_rows, new_pos = jnp.zeros((B, D), kv_pages.dtype), jnp.full((B,), -1, jnp.int32)
    K = indices.shape[-1]
    block_k = _slot_block(block_k, K)
    indices = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, -K % block_k)), constant_values=-1)
    q = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)
    o = decode_call(q, kv_pages.reshape(-1, D), new_rows.astype(kv_pages.dtype), new_pos.astype(jnp.int32),
                    page_table.astype(jnp.int32), indices, float(scale), page_size, block_k)
    return o[..., :R].astype(q_lat.dtype)


__all__ = ["decode_call", "tpu_sparse_mla_decode_paged"]
