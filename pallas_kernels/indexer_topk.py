"""Fused lightning-indexer scoring and top-k selection (docs/architecture.md#lsa).

Reference: `longcat_jax.model.indexer.select` (the model's own selection path, which materialises [B,T,S]
scores). This computes its int32 [B,T,K] key indices without ever holding the scores of the whole problem:

  score[t,s] = sum_i w[t,i] ReLU(q[t,i] . k[s])    in f32, i over indexer heads (docs/architecture.md#indexer)
  value[t,s] = -inf   s is not a valid key for t (future key, k_valid False, another document)
               +inf   SI forces s (sinks, local window)
               -inf   HI: s is outside the query's chosen blocks and own block, in a row with > K valid keys
               score  otherwise
  indices    = top-K of value per query, ties to the lower key index, -inf picks written as -1.

  xla     `lax.map` over query blocks of bq rows. Without HI a step scores [B, bq, S]. With HI it scores
          only gathered keys, [B, bq, G*Bh] with G*Bh ~ M*Bh (M = hi_top_blocks blocks of Bh keys), after
          the block stage's [B, bq, S/Bh]: memory O(bq * (S/Bh + G*Bh*J)), work O(T * (S/Bh + G*Bh)) instead
          of O(T * S) (`indexer_hi._hi_sparse_rows`).
  pallas  a kernel per (batch, query block) streams key tiles of bk keys, scores each [bq, bk] tile in f32
          and merges it into a running top-K held as a bitonic buffer (`bitonic.merge_top`, K rounded up to a
          power of two): memory O(bq * (K + bk)), no score reaches HBM. It visits only the tiles some row of
          the block can keep (a compacted tile list): causally reachable and, under HI, holding a chosen
          block of a row, a window key or a sink (every tile when a row is dense).

HI (docs/architecture.md#hi) lives in `indexer_hi` (block stage, sorted key index, gathered rows, tile plan);
the rules both paths apply to a key live in `indexer_rules`; the score contraction, top-K with -1 and block
means are the reference's own, from `longcat_jax.ops`.

Selection is discrete: the inputs pass through `stop_gradient`, so the entry point may sit inside a
differentiated function (a bare pallas_call has no JVP). Scores equal the reference's up to rounding: the
backend's dot kernels sum in a shape-dependent order (the gathered [bq, n] contractions and the kernel's tiles
are not the reference's GEMM; the HI block means are the reference's own `block_keys`), so indices are
identical unless two keys' (or blocks') scores lie within a few ulp, which reorders or swaps those two.
Exactly representable inputs give bit-identical scores. Ties follow lax.top_k: total order (0.0 above -0.0),
lower index first, so every candidate list is kept in ascending key order.

The kernel uses the generic `pl.pallas_call` + grid + BlockSpec API with power-of-two tiles, f32 scores and
only operations Pallas lowers for Triton (no lax.top_k, sort, gather or value slicing: heads are read from
their refs and the selection is a sorting network); `tests/kernels/test_lowering.py` lowers it for a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longcat_jax.config import Config
from longcat_jax.ops.block_keys import block_keys
from longcat_jax.ops.indexer_scores import weighted_relu_scores
from longcat_jax.ops.lsa_rules import top_k_indices, use_hierarchical
from pallas_kernels import bitonic, tpu_indexer_topk
from pallas_kernels.impl import backend, compiler_params, interpret, resolve
from pallas_kernels.indexer_hi import (
    _block_stage,
    _gather_ok,
    _hi_sparse_rows,
    _Hier,
    _key_index,
    _row_plan,
    tile_plan,
)
from pallas_kernels.indexer_rules import (
    _INT_MAX,
    _hi_keep,
    _next_pow2,
    _pad_to,
    _streaming,
    _valid_keys,
    _values,
    _width,
)
from pallas_kernels.tile_dot import tile_dot

# Default (block_q, block_k) per path. The kernel holds a [block_q, K] running top-K (keys and ids) in
# registers and sorts [block_q, block_k] tiles, so its tiles are small: at K = 512, 16 x 64 compiles for sm_90
# in about 30 s, 64 x 128 had not finished after 18 minutes (bench/triton_ptx.py).
TILES = {"xla": (64, 128), "pallas": (16, 64), "mosaic": tpu_indexer_topk.TILES}


def select(q, k, w, q_positions, k_positions, cfg: Config, *, k_valid=None, q_segment_ids=None,
           k_segment_ids=None, window_apart: bool = False, impl: str = "auto", block_q: int | None = None,
           block_k: int | None = None):
    """LSA key indices without a [T, S] score tensor; identical to `longcat_jax.model.indexer.select`.

    Args:
      q: [B,T,I,J], k: [B,S,J], w: [B,T,I], float32 or bfloat16 (scores are f32).
      q_positions: int [B,T]; k_positions: int [B,S] (keys may come from a cache, so S may exceed T).
      cfg: K = cfg.index_topk, SI and HI settings; HI runs when `ops.lsa_rules.use_hierarchical(cfg, S)`.
      k_valid: bool [B,S] or None (unwritten cache rows, padding).
      q_segment_ids, k_segment_ids: int [B,T] and [B,S], both or neither (packed documents: a key counts for a
        query only when the ids are equal).
      window_apart: SI only. Leave the local window (keys at positions p - local + 1 .. p of the query's
        document) out of the selection, for `sparse_mla(..., window=local)` to read as a contiguous band:
        K - local slots, the full selection with its window slots removed (order kept). The top-k then
        ranks K - local instead of K.
      impl: "auto" | "xla" | "pallas". block_q, block_k: powers of two, clamped to the problem size; None =
        the path's default (`TILES`).
    Returns:
      int32 [B,T,K] key indices (into the key axis), best first, ties to the lower index, -1 in empty slots.
      Equal to `indexer.select(..., k_valid, q_segment_ids=q_seg, k_segment_ids=k_seg)`.
    """
    impl = resolve(impl)
    impl = "mosaic" if impl == "pallas" and backend() == "mosaic" else impl  # TPU: tpu_indexer_topk
    block_q = TILES[impl][0] if block_q is None else block_q
    block_k = TILES[impl][1] if block_k is None else block_k
    _validate(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids, block_q, block_k)
    if window_apart and not cfg.si_enabled:
        raise ValueError("indexer_topk.select: window_apart needs SI (cfg.si_enabled); without it no window "
                         "is forced in")
    bq = min(block_q, _next_pow2(q.shape[1]))
    bk = min(block_k, _next_pow2(k.shape[1]))
    return _select(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids,
                   cfg=cfg, impl=impl, bq=bq, bk=bk, apart=window_apart, interpreted=interpret())


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "bq", "bk", "apart", "interpreted"))
def _select(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids, *, cfg, impl, bq, bk,
            apart, interpreted):
    """Normalises the masks (absent ones become all-true), prepares HI and picks the path. `interpreted` only
    keys jit's cache: a kernel traced compiled (impl.lowering_for) must not be reused interpreted."""
    del interpreted
    B, T, _, _ = q.shape
    S = k.shape[1]
    q, k, w = (jax.lax.stop_gradient(x) for x in (q, k, w))
    q_positions, k_positions = q_positions.astype(jnp.int32), k_positions.astype(jnp.int32)
    has_segments = q_segment_ids is not None
    q_seg = q_segment_ids.astype(jnp.int32) if has_segments else jnp.zeros((B, T), jnp.int32)
    k_seg = k_segment_ids.astype(jnp.int32) if has_segments else jnp.zeros((B, S), jnp.int32)
    k_ok = k_valid.astype(bool) if k_valid is not None else jnp.ones((B, S), bool)

    hier = None
    if use_hierarchical(cfg, S):
        # As the reference: the means pool the keys k_valid admits (a padding key none), never restricted
        # by the segments, so the chosen blocks are the same.
        k_bar, count = block_keys(k, k_positions, cfg.hi_block_size, k_valid)
        index = _key_index(k_positions, k_ok, k_seg)
        hier = _Hier(k_bar, count, index, *_row_plan(index, q_positions, q_seg, cfg))

    args = (q, k, w, q_positions, k_positions, k_ok, q_seg, k_seg, cfg, apart, hier, bq)
    if impl == "xla":
        return _select_xla(*args)
    if impl == "mosaic":
        return tpu_indexer_topk.tpu_select(*args, bk)
    return _select_pallas(*args, bk)


def _validate(q, k, w, q_positions, k_positions, k_valid, q_seg, k_seg, block_q, block_k):
    def need(ok, msg):
        if not ok:
            raise ValueError(f"indexer_topk.select: {msg}")

    need(q.ndim == 4, f"q must be [B,T,I,J], got shape {q.shape}")
    B, T, I, J = q.shape
    need(k.ndim == 3 and k.shape[0] == B and k.shape[2] == J, f"k must be [B,S,J]=[{B},S,{J}], got {k.shape}")
    S = k.shape[1]
    need(w.shape == (B, T, I), f"w must be [B,T,I]={(B, T, I)}, got {w.shape}")
    need(T > 0 and S > 0, "T and S must be positive")
    for name, x in (("q", q), ("k", k), ("w", w)):
        need(jnp.issubdtype(x.dtype, jnp.floating), f"{name} must be floating point, got {x.dtype}")
    need(q_positions.shape == (B, T), f"q_positions must be [B,T]={(B, T)}, got {q_positions.shape}")
    need(k_positions.shape == (B, S), f"k_positions must be [B,S]={(B, S)}, got {k_positions.shape}")
    for name, x in (("q_positions", q_positions), ("k_positions", k_positions)):
        need(jnp.issubdtype(x.dtype, jnp.integer), f"{name} must be integer, got {x.dtype}")
    need(k_valid is None or k_valid.shape == (B, S), f"k_valid must be bool [B,S]={(B, S)} or None")
    need((q_seg is None) == (k_seg is None), "give both q_segment_ids and k_segment_ids, or neither")
    if q_seg is not None:
        need(q_seg.shape == (B, T), f"q_segment_ids must be [B,T]={(B, T)}, got {q_seg.shape}")
        need(k_seg.shape == (B, S), f"k_segment_ids must be [B,S]={(B, S)}, got {k_seg.shape}")
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        need(isinstance(n, int) and n > 0 and n & (n - 1) == 0, f"{name} must be a power of two, got {n}")


# --- XLA path -----------------------------------------------------------------------------------------------


def _full_rows(qb, wb, qpb, qsb, k, kp, k_ok, k_seg, hier, cfg: Config, apart: bool):
    """One query block from [B, bq, S] scores: every rule on every key (the non-HI path and HI's fallback)."""
    valid = _valid_keys(qpb, kp, k_ok, qsb, k_seg)  # [B, bq, S]
    keep = None
    if hier is not None:
        chosen = _block_stage(qb, wb, qpb, hier.k_bar, hier.count, cfg)
        keep = _hi_keep(chosen, valid.sum(-1) <= cfg.index_topk, qpb, kp, hier.k_bar.shape[1], cfg)
    values = _values(weighted_relu_scores(qb, k, wb), valid, keep, qpb, kp, cfg, apart)
    return top_k_indices(values, _width(cfg, apart))


def _select_xla(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, apart, hier, bq):
    """lax.map over query blocks of bq rows: full rows without HI; with HI the gather path, or the full rows
    for a block holding a row the gather path cannot take."""
    B, T = q.shape[:2]
    T_pad = -(-T // bq) * bq
    n_blocks = T_pad // bq
    sparse = hier is not None and _gather_ok(cfg)
    if sparse:
        # Sorted copies padded past the longest run, so a run never reads beyond the table.
        index, pad = hier.index, max(cfg.hi_block_size, *_streaming(cfg))
        table = jnp.stack([index.valid.astype(jnp.int32), index.seg, index.pos, index.slot], axis=-1)
        table = _pad_to(table, 1, table.shape[1] + pad, 0)
        k_sorted = _pad_to(jnp.take_along_axis(k, index.slot[..., None], axis=1), 1, table.shape[1], 0)

    def blocks(x, value):  # [B, T, ...] -> [n_blocks, B, bq, ...]
        x = _pad_to(x, 1, T_pad, value)
        return jnp.moveaxis(x.reshape(B, n_blocks, bq, *x.shape[2:]), 1, 0)

    def one_block(xs):
        qb, wb, qpb, qsb = xs[:4]
        full = functools.partial(_full_rows, qb, wb, qpb, qsb, k, kp, k_ok, k_seg, hier, cfg, apart)
        if not sparse:
            return full()
        startb, needs_full = xs[4:]
        gathered = functools.partial(_hi_sparse_rows, qb, wb, qpb, qsb, startb, k_sorted, table, hier, cfg,
                                     apart)
        return jax.lax.cond(jnp.any(needs_full), full, gathered)

    xs = [blocks(q, 0), blocks(w, 0), blocks(qp, -1), blocks(q_seg, 0)]
    if sparse:
        xs += [blocks(hier.start, 0), blocks(hier.needs_full, False)]
    out = jax.lax.map(one_block, tuple(xs))
    return jnp.moveaxis(out, 0, 1).reshape(B, T_pad, _width(cfg, apart))[:, :T]


# --- Pallas path --------------------------------------------------------------------------------------------


def _tile_scores(q_ref, w_ref, k):
    """f32 [bq, n] scores of one tile: q_ref [bq,I,J], w_ref [bq,I], k [n,J]; one [bq,J] x [J,n] matmul per
    head (each head read from its ref: Triton lowers no value slicing)."""
    acc = jnp.zeros((q_ref.shape[0], k.shape[0]), jnp.float32)
    for i in range(q_ref.shape[1]):
        logits = tile_dot(q_ref[:, i, :].astype(jnp.float32), k, 1, 1, jax.lax.Precision.HIGHEST)
        acc = acc + w_ref[:, i].astype(jnp.float32)[:, None] * jnp.maximum(logits, 0.0)
    return acc


def _kernel(n_tiles_ref, tiles_ref, q_ref, w_ref, qp_ref, qseg_ref, k_ref, kp_ref, kok_ref, kseg_ref, *rest,
            cfg: Config, apart: bool, bk: int, num_blocks: int):
    """The running top-K is a bitonic buffer of out_ref's width (K rounded up to a power of two)."""
    out_ref = rest[-1]
    qp, q_seg = qp_ref[...], qseg_ref[...]  # [bq]
    bq, width = out_ref.shape
    keep_rule = None
    if num_blocks:  # HI: the block stage and the dense rule were settled outside (see _hi_tile_plan)
        dense, chosen = rest[0][...] != 0, rest[1][...]
        keep_rule = functools.partial(_hi_keep, chosen, dense, qp, num_blocks=num_blocks, cfg=cfg)

    def merge_tile(j, top):
        kb = tiles_ref[j]
        keys = pl.ds(kb * bk, bk)
        kp = kp_ref[keys]
        valid = _valid_keys(qp, kp, kok_ref[keys] != 0, q_seg, kseg_ref[keys])  # [bq, bk]
        scores = _tile_scores(q_ref, w_ref, k_ref[keys, :].astype(jnp.float32))
        keep = keep_rule(kp) if keep_rule is not None else None
        values = _values(scores, valid, keep, qp, kp, cfg, apart)
        tile_ids = kb * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        return bitonic.merge_top(*top, bitonic.order_key(values), tile_ids)

    empty = bitonic.NEG_INF_KEY
    init = (jnp.full((bq, width), empty, jnp.int32), jnp.full((bq, width), _INT_MAX, jnp.int32))
    keys, ids = jax.lax.fori_loop(0, n_tiles_ref[0], merge_tile, init)
    out_ref[...] = jnp.where(keys == empty, -1, ids)


def _select_pallas(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, apart, hier, bq, bk):
    """Pads T to bq and S to bk (padded keys invalid, padded rows dropped); grid (batch, query block)."""
    B, T, I, J = q.shape
    width = _next_pow2(_width(cfg, apart))
    bk = min(bk, width)  # bitonic.merge_top takes tiles no wider than its buffer
    plan = tile_plan(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, hier, bq, bk)
    q, w, qp, q_seg, k, kp, k_seg, k_ok, need = plan[:9]
    T_pad, S_pad = q.shape[1], k.shape[1]
    nqb, nkb = T_pad // bq, S_pad // bk
    extra_inputs, num_blocks = [], 0
    if hier is not None:
        num_blocks = hier.k_bar.shape[1]
        m_pad = _next_pow2(plan.chosen.shape[-1])
        extra_inputs = [plan.dense.astype(jnp.int32), _pad_to(plan.chosen, 2, m_pad, -1)]
    # The needed tiles first (the loop runs over n_tiles of them), each group in ascending order.
    nkb_pad = _next_pow2(nkb)
    tiles = _pad_to(jnp.argsort(~need, axis=-1, stable=True).astype(jnp.int32), 2, nkb_pad, 0)
    n_tiles = need.sum(axis=-1, dtype=jnp.int32)

    def per_query(*tail):  # rows of this query block
        return pl.BlockSpec((None, bq, *tail), lambda b, i: (b, i) + (0,) * len(tail))

    def whole(*shape):  # the batch row's full key axis; the kernel slices key tiles itself
        return pl.BlockSpec((None, *shape), lambda b, i: (b,) + (0,) * len(shape))

    in_specs = [
        pl.BlockSpec((None, 1), lambda b, i: (b, i)),
        pl.BlockSpec((None, None, nkb_pad), lambda b, i: (b, i, 0)),
        per_query(I, J), per_query(I), per_query(), per_query(),
        whole(S_pad, J), whole(S_pad), whole(S_pad), whole(S_pad),
    ]
    inputs = [n_tiles, tiles, q, w, qp, q_seg, k, kp, k_ok.astype(jnp.int32), k_seg]
    if extra_inputs:
        in_specs += [per_query(), per_query(extra_inputs[1].shape[-1])]

    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, apart=apart, bk=bk, num_blocks=num_blocks),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, width), jnp.int32),
        grid=(B, nqb),
        in_specs=in_specs,
        out_specs=per_query(width),
        # 8 warps: with 4, ptxas spills ~21 KB per thread of the sorting network (bench/triton_ptx.py).
        compiler_params=compiler_params(num_warps=8),
        interpret=interpret(),
    )(*inputs, *extra_inputs)
    return out[:, :T, : _width(cfg, apart)]


__all__ = ["select"]
