"""Fused lightning-indexer scoring and top-k selection (SPEC 3.8, 3.9, 7.1-7.5, 7.12).

Computes the int32 [B,T,K] key indices of `longcat_jax.indexer.select` (the reference, which materialises
[B,T,S] scores) without ever holding the scores of the whole problem:

  score[t,s] = sum_i w[t,i] ReLU(q[t,i] . k[s])       in f32, i over indexer heads (SPEC 3.8)
  value[t,s] = -inf   s is not a valid key for t (future key, k_valid False, another document)
               +inf   SI forces s (sinks, local window)
               -inf   HI: s is outside the query's chosen blocks and own block, in a row with > K valid keys
               score  otherwise
  indices    = top-K of value per query, ties to the lower key index, -inf picks written as -1.

  xla     `lax.map` over query blocks of bq rows. Without HI a step scores [B, bq, S]. With HI it scores
          only gathered keys, [B, bq, G*Bh] with G*Bh ~ M*Bh (M = hi_top_blocks blocks of Bh keys), after
          the block stage's [B, bq, S/Bh]: memory O(bq * (S/Bh + G*Bh*J)), work O(T * (S/Bh + G*Bh)) instead
          of O(T * S) (`_hi_sparse_rows`).
  pallas  a kernel per (batch, query block) streams key tiles of bk keys, scores each [bq, bk] tile in f32
          and merges it into a running top-K: memory O(bq * (K + bk)), no score reaches HBM. It visits only
          the tiles some row of the block can keep (a compacted tile list): causally reachable and, under
          HI, holding a chosen block of a row, a window key or a sink (every tile when a row is dense).

HI (SPEC 7.4): `block_keys` pools the block means in linear memory (the reference's one-hot is [B,S,S/Bh]);
each query block scores them and keeps the top M candidates, as the reference. The xla path finds a row's
keys through a sorted key index, the valid keys sorted by (segment, position), where a block, the window or
a document prefix is a contiguous run found by binary search: this serves linear caches and packed
training rows (positions restarting per document). It needs unique positions >= 0 in key order within the
query's document and, at positions >= K, more than K valid keys and the whole SI forced set; a query block
with a row that breaks this (ring-buffer cache, padding repeating a position, holes in k_valid) takes the
full-row path instead (`lax.cond`).

Selection is discrete: the inputs pass through `stop_gradient`, so the entry point may sit inside a
differentiated function (a bare pallas_call has no JVP). Scores equal the reference's up to rounding: the
backend's dot kernels sum in a shape-dependent order (the gathered [bq, n] contractions and the kernel's
tiles are not the reference's GEMM) and HI block means are summed by a scatter-add, so indices are
identical unless two keys' (or blocks') scores lie within a few ulp, which reorders or swaps those two.
Exactly representable inputs give bit-identical scores. Ties follow lax.top_k: total order (0.0 above
-0.0), lower index first, so every candidate list is kept in ascending key order.

The kernel uses the generic `pl.pallas_call` + grid + BlockSpec API with power-of-two tiles and f32
accumulation, but its merge calls `lax.top_k`, which Pallas lowers for neither Triton nor Mosaic in
jax 0.10.2: today it runs in interpret mode only, and a GPU build needs an in-kernel selection.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longcat_jax import indexer as ix
from longcat_jax.config import Config
from pallas_kernels.impl import interpret, resolve

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def select(q, k, w, q_positions, k_positions, cfg: Config, *, k_valid=None, q_segment_ids=None,
           k_segment_ids=None, impl: str = "auto", block_q: int = 64, block_k: int = 128):
    """LSA key indices without a [T, S] score tensor; identical to `longcat_jax.indexer.select`.

    Args:
      q: [B,T,I,J], k: [B,S,J], w: [B,T,I], float32 or bfloat16 (scores are f32).
      q_positions: int [B,T]; k_positions: int [B,S] (keys may come from a cache, so S may exceed T).
      cfg: K = cfg.index_topk, SI and HI settings; HI runs when `indexer.use_hierarchical(cfg, S)`.
      k_valid: bool [B,S] or None (unwritten cache rows, padding).
      q_segment_ids, k_segment_ids: int [B,T] and [B,S], both or neither (packed documents: a key counts for a
        query only when the ids are equal).
      impl: "auto" | "xla" | "pallas". block_q, block_k: powers of two; clamped to the problem size.
    Returns:
      int32 [B,T,K] key indices (into the key axis), best first, ties to the lower index, -1 in empty slots.
      Equal to `indexer.select(..., k_valid[:,None,:] & (q_seg[:,:,None] == k_seg[:,None,:]))`.
    """
    impl = resolve(impl)
    _validate(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids, block_q, block_k)
    bq = min(block_q, _next_pow2(q.shape[1]))
    bk = min(block_k, _next_pow2(k.shape[1]))
    return _select(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids,
                   cfg=cfg, impl=impl, bq=bq, bk=bk)


def block_keys(k, k_positions, block_size: int, k_valid=None):
    """`indexer.block_keys` (mean indexer key per block of positions, SPEC 7.4) by a scatter-add: O(S * J).

    k [B,S,J], k_positions int [B,S], k_valid bool [B,S] or None. Returns (k_bar [B,NB,J] f32, count int32
    [B,NB]), NB = ceil(S / block_size); invalid keys and positions outside [0, NB * block_size) count nowhere.
    """
    B, S, J = k.shape
    nb = -(-S // block_size)
    block = k_positions // block_size
    member = (block >= 0) & (block < nb)
    if k_valid is not None:
        member = member & k_valid
    block = jnp.where(member, block, nb)  # bucket nb collects the non-members and is dropped
    rows = jnp.arange(B)[:, None]
    k_sum = jnp.zeros((B, nb + 1, J), jnp.float32).at[rows, block].add(k.astype(jnp.float32))[:, :nb]
    count = jnp.zeros((B, nb + 1), jnp.float32).at[rows, block].add(1.0)[:, :nb]
    return k_sum / jnp.maximum(count, 1.0)[..., None], count.astype(jnp.int32)


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


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "bq", "bk"))
def _select(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids, *, cfg, impl, bq, bk):
    """Normalises the masks (absent ones become all-true), prepares HI and picks the path."""
    B, T, _, _ = q.shape
    S = k.shape[1]
    q, k, w = (jax.lax.stop_gradient(x) for x in (q, k, w))
    q_positions, k_positions = q_positions.astype(jnp.int32), k_positions.astype(jnp.int32)
    has_segments = q_segment_ids is not None
    q_seg = q_segment_ids.astype(jnp.int32) if has_segments else jnp.zeros((B, T), jnp.int32)
    k_seg = k_segment_ids.astype(jnp.int32) if has_segments else jnp.zeros((B, S), jnp.int32)
    k_ok = k_valid.astype(bool) if k_valid is not None else jnp.ones((B, S), bool)

    hier = None
    if ix.use_hierarchical(cfg, S):
        # The reference pools with k_valid only when its mask is 2-D; with segments its mask is [B,T,S] and
        # the means pool every key. Mirror that so the chosen blocks are the same.
        pool_valid = None if has_segments else k_valid
        k_bar, count = block_keys(k, k_positions, cfg.hi_block_size, pool_valid)
        index = _key_index(k_positions, k_ok, k_seg)
        hier = _Hier(k_bar, count, index, *_row_plan(index, q_positions, q_seg, cfg))

    args = (q, k, w, q_positions, k_positions, k_ok, q_seg, k_seg, cfg, hier, bq)
    if impl == "xla":
        return _select_xla(*args)
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


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pad_to(x, axis: int, size: int, value):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _take(x, idx):
    """x [B, S] gathered at idx int [B, ...] along the key axis."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape[0], -1), axis=1).reshape(idx.shape)


# --- Rules shared by both paths (leading batch dims broadcast: [..., T] queries, [..., S] keys) -------------


def _streaming(cfg: Config):
    """(init, local) of the SI forced set; (0, 0) without SI, where HI has no streaming region."""
    return (cfg.index_init_tokens, cfg.index_local_tokens) if cfg.si_enabled else (0, 0)


def _valid_keys(qp, kp, k_ok, q_seg, k_seg):
    """bool [..., T, S]: causal, k_valid and same document."""
    causal = kp[..., None, :] <= qp[..., :, None]
    return causal & k_ok[..., None, :] & (k_seg[..., None, :] == q_seg[..., :, None])


def _block_stage(q, w, qp, k_bar, count, cfg: Config):
    """HI block choice int32 [B, bq, M]: the top hi_top_blocks candidate blocks, -1 where top-k picked a
    non-candidate. A candidate holds a non-streaming key and has ended by the query (SPEC 7.4)."""
    init, local = _streaming(cfg)
    nb = k_bar.shape[1]
    start = jnp.arange(nb, dtype=jnp.int32) * cfg.hi_block_size
    end = start + cfg.hi_block_size - 1
    qpc = qp[..., :, None]
    candidate = (start <= qpc - local) & (end >= init) & (end <= qpc) & (count[..., None, :] > 0)
    scores = jnp.where(candidate, _weighted_relu(q, k_bar, w), -jnp.inf)
    vals, ids = jax.lax.top_k(scores, min(cfg.hi_top_blocks, nb))
    return jnp.where(vals > -jnp.inf, ids, -1)


def _window_start(qp, cfg: Config):
    """First position of a query's window: its own (incomplete) block and, under SI, its local window."""
    start = (qp // cfg.hi_block_size) * cfg.hi_block_size
    return jnp.minimum(start, qp - cfg.index_local_tokens + 1) if cfg.si_enabled else start


def _hi_keep(chosen, dense_row, qp, kp, num_blocks: int, cfg: Config):
    """bool [..., T, S]: tokens that may compete under HI (chosen block, own block, dense row; SPEC 7.4).

    chosen int [..., T, M] block ids, dense_row bool [..., T]. A key's block is clipped to [0, NB] like the
    reference, NB meaning "no block"; -1 in `chosen` matches nothing.
    """
    Bh = cfg.hi_block_size
    tok_block = jnp.clip(kp // Bh, 0, num_blocks)[..., None, :, None]  # [..., 1, S, 1]
    in_chosen = jnp.any(tok_block == chosen[..., :, None, :], axis=-1)  # [..., T, S]
    current_block = kp[..., None, :] >= (qp[..., :, None] // Bh) * Bh
    return in_chosen | current_block | dense_row[..., :, None]


def _values(scores, valid, keep, qp, kp, cfg: Config):
    """Top-k key values (see module docstring): -inf invalid, +inf forced, -inf outside the HI keep set.
    qp [..., T] and kp [..., S] broadcast against scores [..., T, S]."""
    if keep is not None:
        scores = jnp.where(keep, scores, -jnp.inf)
    if cfg.si_enabled:
        # SI forced set, as `indexer.forced_keys`: sinks and the local window (which holds the query itself).
        kp, qp = kp[..., None, :], qp[..., :, None]
        forced = (kp < cfg.index_init_tokens) | (kp > qp - cfg.index_local_tokens)
        scores = jnp.where(forced, jnp.inf, scores)
    return jnp.where(valid, scores, -jnp.inf)


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


# --- XLA path -----------------------------------------------------------------------------------------------


def _weighted_relu(q, k, w):
    """[B,T,S] scores, the reference's contraction (`indexer._weighted_relu`) on one query block."""
    logits = jnp.einsum("btij,bsj->btis", q.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.einsum("bti,btis->bts", w.astype(jnp.float32), jax.nn.relu(logits))


def _top_k_indices(values, K: int, idx=None):
    """Top-K of values [..., N] as positions on the last axis (or idx [..., N] at them); -1 for -inf picks."""
    if values.shape[-1] < K:
        values = _pad_to(values, values.ndim - 1, K, -jnp.inf)
    vals, pos = jax.lax.top_k(values, K)
    if idx is not None:
        pos = jnp.take_along_axis(idx, pos, axis=-1)
    return jnp.where(vals == -jnp.inf, -1, pos).astype(jnp.int32)


def _full_rows(qb, wb, qpb, qsb, k, kp, k_ok, k_seg, hier, cfg: Config):
    """One query block from [B, bq, S] scores: every rule on every key (the non-HI path and HI's fallback)."""
    valid = _valid_keys(qpb, kp, k_ok, qsb, k_seg)  # [B, bq, S]
    keep = None
    if hier is not None:
        chosen = _block_stage(qb, wb, qpb, hier.k_bar, hier.count, cfg)
        keep = _hi_keep(chosen, valid.sum(-1) <= cfg.index_topk, qpb, kp, hier.k_bar.shape[1], cfg)
    values = _values(_weighted_relu(qb, k, wb), valid, keep, qpb, kp, cfg)
    return _top_k_indices(values, cfg.index_topk)


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


def _hi_sparse_rows(qb, wb, qpb, qsb, startb, k_sorted, table, hier: _Hier, cfg: Config):
    """One HI query block from gathered runs of the sorted keys (rows needing the full row excluded).

    The scored ("dynamic") keys are G runs of Bh sorted keys per row: at p >= K its chosen blocks in
    ascending order, clipped off the sinks and the window, and without SI its own block; at p < K (at most K
    valid keys) its whole unforced prefix. Under SI the forced keys come first in key order (+inf, ties to the
    lower index), read from the sinks and window runs without scoring, then the top K - init - local dynamic
    keys. Runs hold keys in key order (no `bad` pairs), so lax.top_k's tie rule is the reference's.
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
    dynamic = _top_k_indices(jnp.where(valid, scores, -jnp.inf), D, info[..., 3])
    if not si:
        return dynamic

    # Forced keys of a run are a prefix of it; a row has all init + local of them, or it is a p < K row whose
    # dynamic keys all fit in D slots, so the output is [valid sinks, valid window, dynamic][:K].
    forced = []
    for run_first, limit, width in ((startb, jnp.minimum(init, window) - 1, init),
                                    (_search(hier.index, qsb, window[..., 0]), p, local)):
        if width:
            run = _read_runs(table, run_first, width)  # [B, bq, width, 4]
            ok = (run[..., 0] != 0) & (run[..., 1] == seg) & (run[..., 2] <= limit)
            forced.append((run[..., 3], ok.sum(-1, keepdims=True)))
    pool = jnp.concatenate([slots for slots, _ in forced] + [dynamic], axis=-1)  # [B, bq, K]
    j = jnp.arange(K)
    src, taken = j, jnp.zeros_like(p)
    for slots, n in forced:  # output slot j >= taken reads past the invalid tail of this run
        src = jnp.where(j >= taken + n, src + slots.shape[-1] - n, src)
        taken = taken + n
    return jnp.where(src < K, jnp.take_along_axis(pool, jnp.minimum(src, K - 1), axis=-1), -1)


def _select_xla(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, hier, bq):
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
        full = functools.partial(_full_rows, qb, wb, qpb, qsb, k, kp, k_ok, k_seg, hier, cfg)
        if not sparse:
            return full()
        startb, needs_full = xs[4:]
        gathered = functools.partial(_hi_sparse_rows, qb, wb, qpb, qsb, startb, k_sorted, table, hier, cfg)
        return jax.lax.cond(jnp.any(needs_full), full, gathered)

    xs = [blocks(q, 0), blocks(w, 0), blocks(qp, -1), blocks(q_seg, 0)]
    if sparse:
        xs += [blocks(hier.start, 0), blocks(hier.needs_full, False)]
    out = jax.lax.map(one_block, tuple(xs))
    return jnp.moveaxis(out, 0, 1).reshape(B, T_pad, cfg.index_topk)[:, :T]


# --- Pallas path --------------------------------------------------------------------------------------------


def _tile_scores(q, k, w):
    """f32 [bq, n] scores of one tile: q [bq,I,J], k [n,J], w [bq,I]; one [bq,J] x [J,n] matmul per head."""
    acc = jnp.zeros((q.shape[0], k.shape[0]), jnp.float32)
    for i in range(q.shape[1]):
        logits = jax.lax.dot_general(q[:, i, :], k, (((1,), (1,)), ((), ())),
                                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        acc = acc + w[:, i : i + 1] * jnp.maximum(logits, 0.0)
    return acc


def _merge_topk(run_vals, run_idx, tile_vals, tile_idx, K: int):
    """Top-K of the running set and one tile.

    The running set holds only lower key indices (tiles are visited in ascending order) and is itself ordered
    (value descending, index ascending), so putting it first makes lax.top_k's lower-position-wins tie rule
    the lower-key-index-wins rule.
    """
    vals = jnp.concatenate([run_vals, tile_vals], axis=1)
    idx = jnp.concatenate([run_idx, tile_idx], axis=1)
    top_vals, pos = jax.lax.top_k(vals, K)
    return top_vals, jnp.take_along_axis(idx, pos, axis=1)


def _kernel(n_tiles_ref, tiles_ref, q_ref, w_ref, qp_ref, qseg_ref, k_ref, kp_ref, kok_ref, kseg_ref, *rest,
            cfg: Config, bk: int, num_blocks: int):
    out_ref = rest[-1]
    K = cfg.index_topk
    q = q_ref[...].astype(jnp.float32)  # [bq, I, J]
    w = w_ref[...].astype(jnp.float32)  # [bq, I]
    qp, q_seg = qp_ref[...], qseg_ref[...]  # [bq]
    bq = q.shape[0]
    keep_rule = None
    if num_blocks:  # HI: the block stage and the dense rule were settled outside (see _hi_tile_plan)
        dense, chosen = rest[0][...] != 0, rest[1][...]
        keep_rule = functools.partial(_hi_keep, chosen, dense, qp, num_blocks=num_blocks, cfg=cfg)

    def merge_tile(j, carry):
        kb = tiles_ref[j]
        keys = pl.ds(kb * bk, bk)
        kp = kp_ref[keys]
        valid = _valid_keys(qp, kp, kok_ref[keys] != 0, q_seg, kseg_ref[keys])  # [bq, bk]
        scores = _tile_scores(q, k_ref[keys, :].astype(jnp.float32), w)
        keep = keep_rule(kp) if keep_rule is not None else None
        values = _values(scores, valid, keep, qp, kp, cfg)
        tile_idx = jnp.broadcast_to(kb * bk + jnp.arange(bk, dtype=jnp.int32), (bq, bk))
        return _merge_topk(*carry, values, tile_idx, K)

    init = (jnp.full((bq, K), -jnp.inf, jnp.float32), jnp.zeros((bq, K), jnp.int32))
    vals, idx = jax.lax.fori_loop(0, n_tiles_ref[0], merge_tile, init)
    out_ref[...] = jnp.where(vals == -jnp.inf, -1, idx)


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


def _select_pallas(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, hier, bq, bk):
    """Pads T to bq and S to bk (padded keys invalid, padded rows dropped); grid (batch, query block)."""
    B, T, I, J = q.shape
    S = k.shape[1]
    K = cfg.index_topk
    T_pad, S_pad = -(-T // bq) * bq, -(-S // bk) * bk
    nqb, nkb = T_pad // bq, S_pad // bk
    q, w = _pad_to(q, 1, T_pad, 0), _pad_to(w, 1, T_pad, 0)
    qp, q_seg = _pad_to(qp, 1, T_pad, -1), _pad_to(q_seg, 1, T_pad, 0)
    k, kp, k_seg = _pad_to(k, 1, S_pad, 0), _pad_to(kp, 1, S_pad, 0), _pad_to(k_seg, 1, S_pad, 0)
    k_ok = _pad_to(k_ok, 1, S_pad, False)

    extra_inputs, num_blocks = [], 0
    if hier is None:
        # Reachable key tiles: those holding a valid key at or before the block's largest query position.
        k_min = jnp.where(k_ok, kp, _INT_MAX).reshape(B, nkb, bk).min(axis=-1)
        need = k_min[:, None, :] <= qp.reshape(B, nqb, bq).max(axis=-1)[:, :, None]
    else:
        num_blocks = hier.k_bar.shape[1]
        real = jnp.broadcast_to(jnp.arange(T_pad) < T, (B, T_pad))
        dense = _pad_to(hier.n_valid <= K, 1, T_pad, False)
        chosen, need = _hi_tile_plan(q, w, qp, real, dense, kp, k_ok, hier, cfg, bq, bk)
        m_pad = _next_pow2(chosen.shape[-1])
        extra_inputs = [dense.astype(jnp.int32), _pad_to(chosen, 2, m_pad, -1)]
    # The needed tiles first, each group in ascending order (the merge relies on ascending key indices).
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
        functools.partial(_kernel, cfg=cfg, bk=bk, num_blocks=num_blocks),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, K), jnp.int32),
        grid=(B, nqb),
        in_specs=in_specs,
        out_specs=per_query(K),
        interpret=interpret(),
    )(*inputs, *extra_inputs)
    return out[:, :T]


__all__ = ["select", "block_keys"]
