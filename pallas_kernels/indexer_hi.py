"""Hierarchical indexing (HI, docs/architecture.md#hi) for `indexer_topk`: block stage, sorted key index,
tile plan.

The block means come from `longcat_jax.ops.block_keys` (linear memory, the same function as the reference);
each query block scores them and keeps the top M candidates, as the reference (`_block_stage`). The xla path
finds a row's keys through a sorted key index, the valid keys sorted by (segment, position), where a block,
the window or a document prefix is a contiguous run found by binary search: this serves linear caches and
packed training rows (positions restarting per document). It needs unique positions >= 0 in key order within
the query's document and, at positions >= K, more than K valid keys and the whole SI forced set; a query block
with a row that breaks this (ring-buffer cache, padding repeating a position, holes in k_valid) takes the
full-row path instead (`_row_plan` marks it, `indexer_topk` branches with `lax.cond`). The gathered rows
(`_hi_sparse_rows`) score [bq, G*Bh] keys, G*Bh ~ M*Bh, instead of [bq, S]. The Pallas path instead gets its
chosen blocks and the list of key tiles worth visiting from `_hi_tile_plan`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from longcat_jax.config import Config
from longcat_jax.ops.indexer_scores import weighted_relu_scores
from longcat_jax.ops.lsa_rules import top_k_indices
from pallas_kernels.indexer_rules import _INT_MAX, _INT_MIN, _pad_to, _streaming, _take, _window_start


class _KeyIndex(NamedTuple):
    """Each batch row's keys sorted by (invalid, segment, position, slot), [B, S] each. bad [B, S+1]: bad[i]
    counts the neighbours j-1, j (j < i) of one document at one position or out of key order."""

    valid: jax.Array
    seg: jax.Array
    pos: jax.Array
    slot: jax.Array  # the key's index on the key axis
    bad: jax.Array


class _Hier(NamedTuple):
    """HI inputs: block means and counts, the key index and, per query [B, T] (`_row_plan`), the sorted index
    of its document's first key at position >= 0, its valid-key count and whether it needs the full row."""

    k_bar: jax.Array
    count: jax.Array
    index: _KeyIndex
    start: jax.Array
    n_valid: jax.Array
    needs_full: jax.Array


def _block_stage(q, w, qp, k_bar, count, cfg: Config):
    """HI block choice int32 [B, bq, M]: the top hi_top_blocks candidate blocks, -1 where top-k picked a
    non-candidate. A candidate holds a non-streaming key and has ended by the query
    (docs/architecture.md#hi)."""
    init, local = _streaming(cfg)
    nb = k_bar.shape[1]
    start = jnp.arange(nb, dtype=jnp.int32) * cfg.hi_block_size
    end = start + cfg.hi_block_size - 1
    qpc = qp[..., :, None]
    candidate = (start <= qpc - local) & (end >= init) & (end <= qpc) & (count[..., None, :] > 0)
    scores = jnp.where(candidate, weighted_relu_scores(q, k_bar, w), -jnp.inf)
    vals, ids = jax.lax.top_k(scores, min(cfg.hi_top_blocks, nb))
    return jnp.where(vals > -jnp.inf, ids, -1)


# --- Sorted key index (HI) ----------------------------------------------------------------------------------


def _key_index(kp, k_ok, k_seg) -> _KeyIndex:
    B, S = kp.shape
    slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    invalid, seg, pos, slot = jax.lax.sort(((~k_ok).astype(jnp.int32), k_seg, kp, slot), num_keys=4)
    valid = invalid == 0
    same_doc = valid[:, 1:] & valid[:, :-1] & (seg[:, 1:] == seg[:, :-1])
    bad = same_doc & ((pos[:, 1:] == pos[:, :-1]) | (slot[:, 1:] < slot[:, :-1]))
    bad = jnp.cumsum(jnp.pad(bad, ((0, 0), (2, 0))).astype(jnp.int32), axis=1)
    return _KeyIndex(valid, seg, pos, slot, bad)


def _search(index: _KeyIndex, seg, pos, *, right: bool = False):
    """Sorted index int32 [B, ...] of the first valid key after (segment, position) (right) or at/after it.

    seg and pos int [B, ...]; a binary search of ceil(log2(S + 1)) steps over each batch row.
    """
    S = index.pos.shape[1]

    def step(_, bounds):
        lo, hi = bounds
        mid = jnp.minimum((lo + hi) // 2, S - 1)
        k_seg, k_pos = _take(index.seg, mid), _take(index.pos, mid)
        before = (k_pos <= pos) if right else (k_pos < pos)
        go_right = (lo < hi) & _take(index.valid, mid) & ((k_seg < seg) | ((k_seg == seg) & before))
        return jnp.where(go_right, mid + 1, lo), jnp.where((lo < hi) & ~go_right, mid, hi)

    lo, _ = jax.lax.fori_loop(0, S.bit_length(), step, (jnp.zeros_like(pos), jnp.full_like(pos, S)))
    return lo


def _row_plan(index: _KeyIndex, qp, q_seg, cfg: Config):
    """Per query [B, T]: (start, n_valid, needs_full), see `_Hier`. The gather path reads a document's keys
    at positions 0..p as the run [start, end) of the index, so it needs that run free of `bad` pairs and of
    negative positions; a row at p >= K needs more than K valid keys (else it is dense) and, under SI, its
    whole forced set (sinks, window), which it places without scoring."""
    K, (init, local) = cfg.index_topk, _streaming(cfg)
    lowest = _search(index, q_seg, jnp.full_like(qp, _INT_MIN))
    start = _search(index, q_seg, jnp.zeros_like(qp))
    end = _search(index, q_seg, qp, right=True)
    n_valid = end - lowest
    irregular = _take(index.bad, end) - _take(index.bad, jnp.minimum(lowest + 1, end)) > 0
    negative = jnp.minimum(start, end) > lowest
    long_row = qp >= K
    needs_full = irregular | negative | (long_row & (n_valid <= K))
    if cfg.si_enabled:
        sinks_end = _search(index, q_seg, jnp.full_like(qp, init))
        n_forced = sinks_end - start + end - _search(index, q_seg, qp - local + 1)
        needs_full = needs_full | (long_row & (n_forced < init + local))
    return start, n_valid, needs_full


# --- XLA path: gathered HI rows -----------------------------------------------------------------------------


def _gather_ok(cfg: Config) -> bool:
    """The gather path places the SI window unscored, so the window must hold only forced keys (local >= Bh)
    and leave dynamic slots (init + local < K): Config invariants whenever the indexer, HI and SI are on."""
    init, local = _streaming(cfg)
    return not cfg.si_enabled or (local >= cfg.hi_block_size and init + local < cfg.index_topk)


def _read_runs(table, first, width: int):
    """Rows first + [0, width) of table [B, S_pad, C] for first int [B, ...]: [B, ..., width, C]."""
    B = table.shape[0]

    def one_row(rows, starts):
        return jax.vmap(lambda f: jax.lax.dynamic_slice_in_dim(rows, f, width))(starts)

    return jax.vmap(one_row)(table, first.reshape(B, -1)).reshape(*first.shape, width, table.shape[-1])


def _hi_sparse_rows(qb, wb, qpb, qsb, startb, k_sorted, table, hier: _Hier, cfg: Config, apart: bool):
    """One HI query block from gathered runs of the sorted keys (rows needing the full row excluded).

    The scored ("dynamic") keys are G runs of Bh sorted keys per row: at p >= K its chosen blocks in
    ascending order, clipped off the sinks and the window, and without SI its own block; at p < K (at most K
    valid keys) its whole unforced prefix. Under SI the forced keys come first in key order (+inf, ties to the
    lower index), read from the sinks and window runs without scoring, then the top K - init - local dynamic
    keys; with `apart` the window run is left out (K - local slots). Runs hold keys in key order (no `bad`
    pairs), so lax.top_k's tie rule is the reference's.
    table int32 [B, S_pad, 4] = (valid, segment, position, slot) and k_sorted [B, S_pad, J] follow the index.
    """
    B, bq = qpb.shape
    K, Bh, si = cfg.index_topk, cfg.hi_block_size, cfg.si_enabled
    init, local = _streaming(cfg)
    nb = hier.k_bar.shape[1]
    D = K - init - local  # dynamic slots of a row with its whole forced set
    p, seg = qpb[..., None], qsb[..., None]
    window = _window_start(qpb, cfg)[..., None]  # SI: p - local + 1; otherwise its own block's start

    chosen = _block_stage(qb, wb, qpb, hier.k_bar, hier.count, cfg)
    chosen = jnp.sort(jnp.where(chosen < 0, nb, chosen), axis=-1)  # "none" (nb) sorts last, empty run
    lo = jnp.maximum(chosen * Bh, init)
    hi = jnp.where(chosen < nb, jnp.minimum(chosen * Bh + Bh - 1, window - 1), -1)
    if not si:
        lo, hi = jnp.concatenate([lo, window], -1), jnp.concatenate([hi, p], -1)
    G = max(lo.shape[-1], -(-D // Bh))
    lo, hi = _pad_to(lo, 2, G, 0), _pad_to(hi, 2, G, -1)
    first = _search(hier.index, jnp.broadcast_to(seg, lo.shape), lo)
    prefix = p < K
    prefix_first = _search(hier.index, qsb, jnp.full_like(qpb, init))[..., None] + Bh * jnp.arange(G)
    first = jnp.where(prefix, prefix_first, first)
    hi = jnp.where(prefix, (window - 1) if si else p, hi)

    info = _read_runs(table, first, Bh).reshape(B, bq, G * Bh, 4)
    keys = _read_runs(k_sorted, first, Bh).reshape(B, bq, G * Bh, -1).astype(jnp.float32)
    valid = (info[..., 0] != 0) & (info[..., 1] == seg) & (info[..., 2] <= jnp.repeat(hi, Bh, axis=-1))
    # Keys-major contractions: on CPU several times faster than the reference's heads-major layout.
    logits = jnp.einsum("bqnj,bqij->bqni", keys, qb.astype(jnp.float32))
    scores = jnp.einsum("bqni,bqi->bqn", jax.nn.relu(logits), wb.astype(jnp.float32))
    dynamic = top_k_indices(jnp.where(valid, scores, -jnp.inf), D, info[..., 3])
    if not si:
        return dynamic

    # Forced keys of a run are a prefix of it; a row has all init + local of them, or it is a p < K row whose
    # dynamic keys all fit in D slots, so the output is [valid sinks, valid window, dynamic][:K].
    forced = []
    for run_first, limit, width in ((startb, jnp.minimum(init, window) - 1, init),
                                    (_search(hier.index, qsb, window[..., 0]), p, 0 if apart else local)):
        if width:
            run = _read_runs(table, run_first, width)  # [B, bq, width, 4]
            ok = (run[..., 0] != 0) & (run[..., 1] == seg) & (run[..., 2] <= limit)
            forced.append((run[..., 3], ok.sum(-1, keepdims=True)))
    pool = jnp.concatenate([slots for slots, _ in forced] + [dynamic], axis=-1)  # [B, bq, K or K - local]
    width = pool.shape[-1]
    j = jnp.arange(width)
    src, taken = j, jnp.zeros_like(p)
    for slots, n in forced:  # output slot j >= taken reads past the invalid tail of this run
        src = jnp.where(j >= taken + n, src + slots.shape[-1] - n, src)
        taken = taken + n
    return jnp.where(src < width, jnp.take_along_axis(pool, jnp.minimum(src, width - 1), axis=-1), -1)


# --- Pallas path: HI tile plan ------------------------------------------------------------------------------


def _hi_tile_plan(q, w, qp, real, dense, kp, k_ok, hier: _Hier, cfg: Config, bq: int, bk: int):
    """HI per query block (inputs padded to bq / bk): chosen blocks int32 [B, T_pad, M] and the key tiles a
    row may keep, bool [B, nqb, nkb]: causally reachable and holding a chosen block of some row, a key at or
    after the earliest window start, or a sink; every reachable tile when a row is dense. A superset of the
    kept keys, so skipping the other tiles (all -inf) leaves the result unchanged. O(S) memory per step."""
    B, T_pad = qp.shape
    S_pad = kp.shape[1]
    nb = hier.k_bar.shape[1]
    init, _ = _streaming(cfg)
    key_block = jnp.clip(kp // cfg.hi_block_size, 0, nb)
    rows = jnp.arange(B)[:, None]

    def one_block(xs):
        qb, wb, qpb, realb, denseb = xs
        chosen = _block_stage(qb, wb, qpb, hier.k_bar, hier.count, cfg)
        ids = jnp.where(chosen < 0, nb + 1, chosen).reshape(B, -1)
        union = jnp.zeros((B, nb + 2), bool).at[rows, ids].set(True)
        in_chosen = _take(union[:, : nb + 1], key_block)  # column nb ("no block") stays False
        window = jnp.where(realb, _window_start(qpb, cfg), _INT_MAX).min(-1, keepdims=True)
        dense_any = jnp.any(denseb & realb, -1, keepdims=True)
        need = in_chosen | (kp >= window) | (kp < init) | dense_any
        need = need & k_ok & (kp <= qpb.max(-1, keepdims=True))
        return chosen, need.reshape(B, S_pad // bk, bk).any(-1)

    def blocks(x):  # [B, T_pad, ...] -> [nqb, B, bq, ...]
        return jnp.moveaxis(x.reshape(B, T_pad // bq, bq, *x.shape[2:]), 1, 0)

    chosen, need = jax.lax.map(one_block, tuple(map(blocks, (q, w, qp, real, dense))))
    return jnp.moveaxis(chosen, 0, 1).reshape(B, T_pad, -1), jnp.moveaxis(need, 0, 1)



class _TilePlan(NamedTuple):
    """The inputs of a top-k kernel padded to its blocks, and which key tiles each query block needs."""

    q: jax.Array  # [B, T_pad, I, J]; w, qp, q_seg likewise padded on T (padded rows dropped later)
    w: jax.Array
    qp: jax.Array
    q_seg: jax.Array
    k: jax.Array  # [B, S_pad, J]; kp, k_seg, k_ok padded on S (padded keys invalid)
    kp: jax.Array
    k_seg: jax.Array
    k_ok: jax.Array
    need: jax.Array  # bool [B, T_pad / bq, S_pad / bk]
    dense: jax.Array | None  # HI only: bool [B, T_pad], rows whose valid keys fit in top-K
    chosen: jax.Array | None  # HI only: the chosen blocks per query row (`_hi_tile_plan`)


def tile_plan(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg: Config, hier: _Hier | None, bq: int,
              bk: int) -> _TilePlan:
    """Pad T to bq and S to bk, and find the key tiles each query block needs: the tiles holding a valid key
    at or before the block's largest query position, or HI's chosen blocks (the Triton and the Mosaic top-k
    kernels share it)."""
    B, T = q.shape[:2]
    S = k.shape[1]
    T_pad, S_pad = -(-T // bq) * bq, -(-S // bk) * bk
    nqb, nkb = T_pad // bq, S_pad // bk
    q, w = _pad_to(q, 1, T_pad, 0), _pad_to(w, 1, T_pad, 0)
    qp, q_seg = _pad_to(qp, 1, T_pad, -1), _pad_to(q_seg, 1, T_pad, 0)
    k, kp, k_seg = _pad_to(k, 1, S_pad, 0), _pad_to(kp, 1, S_pad, 0), _pad_to(k_seg, 1, S_pad, 0)
    k_ok = _pad_to(k_ok, 1, S_pad, False)
    dense = chosen = None
    if hier is None:
        k_min = jnp.where(k_ok, kp, _INT_MAX).reshape(B, nkb, bk).min(axis=-1)
        need = k_min[:, None, :] <= qp.reshape(B, nqb, bq).max(axis=-1)[:, :, None]
    else:
        real = jnp.broadcast_to(jnp.arange(T_pad) < T, (B, T_pad))
        dense = _pad_to(hier.n_valid <= cfg.index_topk, 1, T_pad, False)
        chosen, need = _hi_tile_plan(q, w, qp, real, dense, kp, k_ok, hier, cfg, bq, bk)
    return _TilePlan(q, w, qp, q_seg, k, kp, k_seg, k_ok, need, dense, chosen)
