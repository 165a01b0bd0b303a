"""Fused lightning-indexer scoring and running top-k, Mosaic (TPU) kernel (docs/architecture.md#lsa).

The TPU form of `indexer_topk._select_pallas`: same inputs (masks normalised and HI prepared by
`indexer_topk._select`), same int32 [B, T, K] result, slot order and ties included. One program per (batch
row, query block of bq rows) walks the key tiles some row of the block can keep (the compacted tile list of
the Triton kernel, HI's `_hi_tile_plan` included), scores each [bq, bk] tile in f32 and merges it into a
running top-K held as a lane bitonic buffer (`tpu_bitonic.merge_top`). No score reaches HBM. The rules are
those of `indexer_rules` (validity, SI's forced set and window apart, HI's keep set around the chosen
blocks, docs/architecture.md#si, #hi), written for a [bq, 1] column of queries against a [1, bk] row of keys,
the 2-D shapes Mosaic's vregs take. CLI needs nothing here: only an owner sublayer calls the selection and
its reuse sublayer takes the integer indices (docs/architecture.md#cli).

What differs from the Triton kernel, and why:
- Key tiles are DMA-ed from HBM, double-buffered, the tile numbers read as scalars from an SMEM block of the
  plan: a whole key row as one VMEM block would not fit at long context (S * J values).
- Scores are one MXU matmul per tile: the block's queries are laid out head-major, [I * bq, J], so
  sum_i w[t,i] ReLU(q[t,i] . k[s]) is a [I * bq, J] x [J, bk] product, a ReLU, a [I * bq, 1] column of
  weights and a sum of I sublane-aligned [bq, bk] slices (heads summed in order, as the reference's einsum).
- Every width obeys Mosaic's tiling: bq a multiple of 8 (at least 8 rows, padded), bk and the top-K buffer
  W = max(128, next_pow2(K)) powers of two >= 128 lanes, bk <= W. Per-query vectors are [bq, 1] columns,
  HI's chosen blocks [M, bq, 1], key metadata (position, valid, segment) a [3, bk] tile.
- Integer division is lax.div (jnp's `//` lowers through `sign`, which needs a TPU to lower), made floor
  division for negative positions by hand.

Reference: `longcat_jax.model.indexer.select`, through `indexer_topk.select(impl="pallas")` on a (simulated)
TPU (tests/kernels/test_tpu_indexer_topk.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longcat_jax.config import Config
from pallas_kernels import tpu_bitonic
from pallas_kernels.bitonic import NEG_INF_KEY, order_key
from pallas_kernels.impl import mosaic_params, tpu_interpret
from pallas_kernels.indexer_hi import _Hier, tile_plan
from pallas_kernels.indexer_rules import _INT_MAX, _next_pow2, _width

# Default (block_q, block_k): 8 query rows (one sublane tile; the MXU sees I * 8 rows) and 512-key tiles, cut
# to the top-K buffer's width. Per key the work is sorting the tile (log2(bk)^2 / 2 layers) plus a share of
# the buffer merge (W log2(W) / bk), least near bk ~ W.
TILES = (8, 512)
_LANES = 128


def _floor_div(x, d: int):
    """floor(x / d) for int32 x and d > 0, with lax.div (which truncates)."""
    return jax.lax.div(x - jnp.where(x < 0, d - 1, 0), jnp.int32(d))


def _tile_values(scores, qp, q_seg, kp, k_ok, k_seg, keep, cfg: Config, apart: bool):
    """`indexer_rules._values` for a [bq, 1] query column against a [1, bk] key row: -inf invalid or outside
    HI's keep set, +inf SI-forced, -inf in the window when it is kept apart."""
    valid = (kp <= qp) & (k_ok != 0) & (k_seg == q_seg)
    if keep is not None:
        scores = jnp.where(keep, scores, -jnp.inf)
    if cfg.si_enabled:
        window = kp > qp - cfg.index_local_tokens
        scores = jnp.where((kp < cfg.index_init_tokens) | window, jnp.inf, scores)
        if apart:
            scores = jnp.where(window, -jnp.inf, scores)
    return jnp.where(valid, scores, -jnp.inf)


def _hi_keep(chosen_ref, dense, qp, kp, num_blocks: int, cfg: Config):
    """`indexer_rules._hi_keep` in column/row form: a key competes when its block is one of the row's
    chosen blocks (chosen_ref [M, bq, 1], -1 matches nothing), it is in the query's own block, or the row is
    dense."""
    Bh = cfg.hi_block_size
    key_block = jnp.clip(_floor_div(kp, Bh), 0, num_blocks)  # [1, bk]; num_blocks means "no block"
    keep = (kp >= _floor_div(qp, Bh) * Bh) | (dense != 0)
    for m in range(chosen_ref.shape[0]):
        keep = keep | (key_block == chosen_ref[m])
    return keep


def _kernel(plan_smem, q_ref, w_ref, qp_ref, qseg_ref, *rest, cfg: Config, apart: bool, num_blocks: int,
            precision):
    """plan_smem [1, 1 + nkb]: the number of tiles to visit, then the tile numbers (needed ones first)."""
    dense_ref, chosen_ref = rest[:2] if num_blocks else (None, None)
    k_hbm, meta_hbm, out_ref, k_buf, meta_buf, sems = rest[-6:]
    b = pl.program_id(0)
    bq, W = out_ref.shape
    bk = k_buf.shape[1]
    n_heads = q_ref.shape[0] // bq
    n_tiles = plan_smem[0, 0]
    qp, q_seg = qp_ref[...], qseg_ref[...]  # [bq, 1]

    def copies(j, slot):
        tile = plan_smem[0, 1 + j]
        return (pltpu.make_async_copy(k_hbm.at[b, tile], k_buf.at[slot], sems.at[0, slot]),
                pltpu.make_async_copy(meta_hbm.at[b, tile], meta_buf.at[slot], sems.at[1, slot]))

    @pl.when(n_tiles > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    def merge_tile(j, top):
        slot = jax.lax.rem(j, 2)

        @pl.when(j + 1 < n_tiles)
        def _():  # the next tile's copies overlap this tile's scoring and merge
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        logits = jax.lax.dot_general(q_ref[...], k_buf[slot], (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)  # [I * bq, bk]
        weighted = w_ref[...] * jnp.maximum(logits, 0.0)
        scores = weighted[:bq]
        for i in range(1, n_heads):
            scores = scores + weighted[i * bq:(i + 1) * bq]
        kp, k_ok, k_seg = (meta_buf[slot, pl.ds(r, 1), :] for r in range(3))  # [1, bk] each
        keep = None
        if num_blocks:
            keep = _hi_keep(chosen_ref, dense_ref[...], qp, kp, num_blocks, cfg)
        values = _tile_values(scores, qp, q_seg, kp, k_ok, k_seg, keep, cfg, apart)
        ids = plan_smem[0, 1 + j] * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        return tpu_bitonic.merge_top(*top, order_key(values), ids)

    init = (jnp.full((bq, W), NEG_INF_KEY, jnp.int32), jnp.full((bq, W), _INT_MAX, jnp.int32))
    keys, ids = jax.lax.fori_loop(0, n_tiles, merge_tile, init)
    out_ref[...] = jnp.where(keys == NEG_INF_KEY, -1, ids)


def tpu_select(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg: Config, apart: bool, hier: _Hier | None, bq: int,
               bk: int):
    """`indexer_topk._select_pallas` as a Mosaic kernel: same arguments (masks normalised, HI prepared),
    int32 [B, T, K or K - local] indices. bq is raised to at least 8 rows, bk to 128..W keys."""
    B, T, I, J = q.shape
    width = _width(cfg, apart)
    W = max(_LANES, _next_pow2(width))
    bq, bk = max(bq, 8), max(_LANES, min(bk, W))
    tiles = tile_plan(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, hier, bq, bk)
    q, w, qp, q_seg, k, kp, k_seg, k_ok, need = tiles[:9]
    T_pad, S_pad = q.shape[1], k.shape[1]
    nqb, nkb = T_pad // bq, S_pad // bk

    hi_inputs, hi_specs, num_blocks = [], [], 0
    column = pl.BlockSpec((None, bq, 1), lambda b, i: (b, i, 0))
    if hier is not None:
        num_blocks = hier.k_bar.shape[1]
        M = tiles.chosen.shape[-1]
        chosen = tiles.chosen.reshape(B, nqb, bq, M).transpose(0, 1, 3, 2)[..., None]  # [B, nqb, M, bq, 1]
        hi_inputs = [tiles.dense.astype(jnp.int32)[..., None], chosen]
        hi_specs = [column, pl.BlockSpec((None, None, M, bq, 1), lambda b, i: (b, i, 0, 0, 0))]
    # The plan per query block: how many tiles, then the needed tiles first, each group in ascending order.
    tiles = jnp.argsort(~need, axis=-1, stable=True).astype(jnp.int32)
    plan = jnp.concatenate([need.sum(axis=-1, dtype=jnp.int32)[..., None], tiles], axis=-1)[:, :, None]

    if q.dtype != k.dtype:  # one operand type for the MXU
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    precision = jax.lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
    q_heads = q.reshape(B, nqb, bq, I, J).transpose(0, 1, 3, 2, 4).reshape(B, nqb, I * bq, J)
    w_heads = w.astype(jnp.float32).reshape(B, nqb, bq, I).transpose(0, 1, 3, 2).reshape(B, nqb, I * bq, 1)
    k_tiles = k.reshape(B, nkb, bk, J)
    meta = jnp.stack([kp, k_ok.astype(jnp.int32), k_seg], axis=1).reshape(B, 3, nkb, bk).transpose(0, 2, 1, 3)

    def per_block(*shape):
        return pl.BlockSpec((None, None, *shape), lambda b, i: (b, i) + (0,) * len(shape))

    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, apart=apart, num_blocks=num_blocks, precision=precision),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, W), jnp.int32),
        grid=(B, nqb),
        in_specs=[
            pl.BlockSpec((None, None, 1, 1 + nkb), lambda b, i: (b, i, 0, 0), memory_space=pltpu.SMEM),
            per_block(I * bq, J), per_block(I * bq, 1), column, column, *hi_specs,
            pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, bq, W), lambda b, i: (b, i, 0)),
        scratch_shapes=[pltpu.VMEM((2, bk, J), k.dtype), pltpu.VMEM((2, 3, bk), jnp.int32),
                        pltpu.SemaphoreType.DMA((2, 2))],
        compiler_params=mosaic_params("parallel", "parallel"),
        interpret=tpu_interpret(),
    )(plan, q_heads, w_heads, qp[..., None], q_seg[..., None], *hi_inputs, k_tiles, meta)
    return out[:, :T, :width]


__all__ = ["TILES", "tpu_select"]
