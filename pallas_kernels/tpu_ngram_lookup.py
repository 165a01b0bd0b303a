"""Hashed N-gram lookup forward, Mosaic (TPU) kernel (docs/architecture.md#ngram).

    out[p] = sum_g  T[off_g + id_g(p)] @ P_g          [tokens, D], f32 accumulation

The TPU form of `ngram_lookup._forward_pallas`, same arguments (one shard's table slice, its first row
`start`) and result; `ngram_lookup` calls it for impl="pallas" on a TPU and keeps its own custom VJP (the
backward is XLA on every platform), so gradients and row sharding are shared with the other paths.

What differs from the Triton kernel, and why:
- The ids are hashed outside the kernel (`ngram_lookup._hash_windows`, the same exact uint32 mulmod): a DMA
  needs its row number as a scalar in SMEM, and the vector unit's hash results cannot be read as scalars.
  They are [tokens, G] int32, G / D of the output (16 / 8192 at full size), so the fused kernel's
  memory bound is kept.
- Rows are DMA-ed from the table in HBM (a [sum R, ngram_dim] table is never a VMEM block). The grid is
  (token block i, output-column block j) with j innermost and sequential ("arbitrary"): at j = 0 the kernel
  starts all G * block_t row copies of block i at once (one DMA semaphore per branch) into a VMEM scratch
  [G, block_t, ngram_dim] and waits branch by branch, so branch g's matmul runs while later branches are
  still landing; the other column blocks j > 0 reuse the scratch, so each row crosses HBM once per token
  block, not once per column block.
- A row this shard does not own reads row 0 of the slice (a finite row) and is zeroed by a [block_t, 1]
  mask, so the scratch never holds uninitialised memory.

Blocks obey Mosaic's rule: ids per token block as SMEM [1, G * block_t], the owned mask [G, block_t, 1],
proj [G, ngram_dim, block_d] and out [block_t, block_d] with block_t a multiple of 8 and block_d a multiple
of 128 or all of D (`ngram_lookup` picks both).

Reference: `longcat_jax.model.ngram.ngram_embed` (tests/kernels/test_tpu_ngram_lookup.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.impl import mosaic_params, tpu_interpret


def _lookup_kernel(ids_smem, owned_ref, tables_hbm, proj_ref, out_ref, rows_scratch, sems, *, compute_dtype):
    G, block_t, _ = rows_scratch.shape
    first_column_block = pl.program_id(1) == 0

    def copy(g, t):
        src = tables_hbm.at[pl.ds(ids_smem[0, g * block_t + t], 1)]
        return pltpu.make_async_copy(src, rows_scratch.at[g, pl.ds(t, 1)], sems.at[g])

    @pl.when(first_column_block)
    def _():  # every row of the token block in flight before the first matmul
        for g in range(G):

            @pl.loop(0, block_t)
            def _(t, g=g):
                copy(g, t).start()

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for g in range(G):

        @pl.when(first_column_block)
        def _(g=g):
            @pl.loop(0, block_t)
            def _(t):
                copy(g, 0).wait()  # a wait needs only the destination's size and the semaphore

        rows = jnp.where(owned_ref[g] > 0, rows_scratch[g].astype(compute_dtype), 0)
        acc += jnp.dot(rows, proj_ref[g].astype(compute_dtype), preferred_element_type=jnp.float32)
    out_ref[...] = acc.astype(out_ref.dtype)


def lookup_call(tables, proj, local, owned, block_t, block_d, compute_dtype, out_dtype):
    """local int [tokens, G] (rows of `tables`, already clamped), owned bool [tokens, G] -> [tokens, D]."""
    tokens, G = local.shape
    dim, D = proj.shape[1:]
    padded = pl.cdiv(tokens, block_t) * block_t
    nb = padded // block_t
    # Padding tokens read row 0 (in range) and are masked; their outputs are dropped.
    local, owned = (jnp.pad(x, ((0, padded - tokens), (0, 0))) for x in (local, owned))
    ids = local.reshape(nb, block_t, G).transpose(0, 2, 1).reshape(nb, 1, G * block_t)
    owned = owned.reshape(nb, block_t, G).transpose(0, 2, 1)[..., None].astype(jnp.int32)
    out = pl.pallas_call(
        functools.partial(_lookup_kernel, compute_dtype=compute_dtype),
        out_shape=jax.ShapeDtypeStruct((padded, D), out_dtype),
        grid=(nb, D // block_d),
        in_specs=[
            pl.BlockSpec((None, 1, G * block_t), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, G, block_t, 1), lambda i, j: (i, 0, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((G, dim, block_d), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((block_t, block_d), lambda i, j: (i, j)),
        scratch_shapes=[pltpu.VMEM((G, block_t, dim), tables.dtype), pltpu.SemaphoreType.DMA((G,))],
        # j reuses the rows fetched at j = 0: it runs in order on one core; token blocks are independent.
        compiler_params=mosaic_params("parallel", "arbitrary"),
        interpret=tpu_interpret(),
    )(ids, owned, tables, proj)
    return out[:tokens]


def tpu_forward_local(tables, proj, windows_t, start, plan, out_dtype):
    """`ngram_lookup._forward_pallas` as a Mosaic kernel: tables [local rows, ngram_dim] (one shard's slice
    starting at row start[0]), proj [G, ngram_dim, D], windows_t uint32 [N, tokens] -> [tokens, D]."""
    # Imported here: ngram_lookup dispatches to this module, so a top-level import would be circular.
    from pallas_kernels.ngram_lookup import _hash_windows, _local_rows

    cfg, D = plan.cfg, proj.shape[-1]
    local, owned = _local_rows(_hash_windows(windows_t, cfg), start[0], tables.shape[0], cfg)
    # Mosaic wants output columns in multiples of 128 lanes or all of D; the Triton plan may pick fewer.
    block_d = plan.block_d if plan.block_d % 128 == 0 or plan.block_d == D else 128 if D % 128 == 0 else D
    return lookup_call(tables, proj, local, owned, plan.block_t, block_d, cfg.jnp_dtype, out_dtype)


__all__ = ["lookup_call", "tpu_forward_local"]
