"""Fused lightning-indexer scoring and streaming top-k selection (SPEC 3.8, 3.9, 7.1-7.5, 7.12).

Computes the int32 [B,T,K] key indices of `longcat_jax.indexer.select` (the reference, which materialises
[B,T,S] scores) without ever holding the scores of the whole problem:

  score[t,s] = sum_i w[t,i] ReLU(q[t,i] . k[s])       in f32, i over indexer heads (SPEC 3.8)
  value[t,s] = -inf   s is not a valid key for t (future key, k_valid False, another document)
               +inf   SI forces s (sinks, local window)
               -inf   HI: s is outside the query's chosen blocks and own block, in a row with > K valid keys
               score  otherwise
  indices    = top-K of value per query, ties to the lower key index, -inf picks written as -1.

  xla     plain JAX, `lax.map` over query blocks: each step builds [B, bq, S] scores and applies the rules,
          so memory is O(bq * S), never O(T * S).
  pallas  a kernel per (batch, query block) streams over key blocks of size bk, scores the [bq, bk] tile in
          f32 and merges it into a running top-K (values + indices) carried through the key loop: memory is
          O(bq * (K + bk)) and no score reaches HBM. Key blocks after the last one holding a valid key at or
          before the query block's largest position are never visited (causality).

HI (SPEC 7.4): the block means are pooled once outside (`indexer.block_keys`, as the reference does); per
query block both paths score the blocks, keep the top hi_top_blocks candidates, and let only their tokens
(plus the query's own block, the SI forced set and rows with at most K valid keys) into the token stage. The
dense rule needs a row's valid-key count before its first merge, so the kernel counts in a cheap pre-pass.

Selection is discrete: the inputs pass through `stop_gradient`, so the entry point may sit inside a
differentiated function (a bare pallas_call has no JVP). Tile scores equal the reference's up to rounding (a
tile's contraction may sum in another order), so indices are identical unless two keys' scores lie within a
few ulp; exactly representable inputs (the tie tests) give bit-identical scores.

The kernel uses the generic `pl.pallas_call` + grid + BlockSpec API with power-of-two tiles and f32
accumulation, but its merge and block choice call `lax.top_k`, which Pallas lowers for neither Triton nor
Mosaic in jax 0.10.2: today it runs in interpret mode only, and a GPU build needs an in-kernel selection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longcat_jax import indexer as ix
from longcat_jax.config import Config
from pallas_kernels.impl import interpret, resolve

_INT_MAX = jnp.iinfo(jnp.int32).max


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


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "bq", "bk"))
def _select(q, k, w, q_positions, k_positions, k_valid, q_segment_ids, k_segment_ids, *, cfg, impl, bq, bk):
    """Normalises the masks (absent ones become all-true), pools the HI block means and picks the path."""
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
        hier = ix.block_keys(k, k_positions, cfg.hi_block_size, pool_valid)  # (k_bar [B,NB,J], count [B,NB])

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


# --- Rules shared by both paths (leading batch dims broadcast: [..., T] queries, [..., S] keys) -------------


def _valid_keys(qp, kp, k_ok, q_seg, k_seg):
    """bool [..., T, S]: causal, k_valid and same document."""
    causal = kp[..., None, :] <= qp[..., :, None]
    return causal & k_ok[..., None, :] & (k_seg[..., None, :] == q_seg[..., :, None])


def _candidate_blocks(qp, count, cfg: Config):
    """HI candidates bool [..., T, NB]: blocks holding a non-streaming key that have ended by the query."""
    init, local = (cfg.index_init_tokens, cfg.index_local_tokens) if cfg.si_enabled else (0, 0)
    start = jnp.arange(count.shape[-1], dtype=jnp.int32) * cfg.hi_block_size
    end = start + cfg.hi_block_size - 1
    qp = qp[..., :, None]
    return (start <= qp - local) & (end >= init) & (end <= qp) & (count[..., None, :] > 0)


def _chosen_blocks(block_scores, candidate, num_blocks: int, cfg: Config):
    """Ids int32 [..., T, M] of the top hi_top_blocks candidates; -1 where top-k picked a non-candidate."""
    m = min(cfg.hi_top_blocks, num_blocks)
    vals, ids = jax.lax.top_k(jnp.where(candidate, block_scores, -jnp.inf), m)
    return jnp.where(vals > -jnp.inf, ids, -1)


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
    """Top-k key values (see module docstring): -inf invalid, +inf forced, -inf outside the HI keep set."""
    if keep is not None:
        scores = jnp.where(keep, scores, -jnp.inf)
    if cfg.si_enabled:
        # SI forced set, as `indexer.forced_keys`: sinks and the local window (which holds the query itself).
        kp, qp = kp[..., None, :], qp[..., :, None]
        forced = (kp < cfg.index_init_tokens) | (kp > qp - cfg.index_local_tokens)
        scores = jnp.where(forced, jnp.inf, scores)
    return jnp.where(valid, scores, -jnp.inf)


# --- XLA path -----------------------------------------------------------------------------------------------


def _weighted_relu(q, k, w):
    """[B,T,S] scores, the reference's contraction (`indexer._weighted_relu`) on one query block."""
    logits = jnp.einsum("btij,bsj->btis", q.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.einsum("bti,btis->bts", w.astype(jnp.float32), jax.nn.relu(logits))


def _select_xla(q, k, w, qp, kp, k_ok, q_seg, k_seg, cfg, hier, bq):
    """lax.map over query blocks of bq rows; each step runs the full-row rules on [B, bq, S] scores."""
    B, T = q.shape[:2]
    K = cfg.index_topk
    T_pad = -(-T // bq) * bq
    n_blocks = T_pad // bq

    def blocks(x, value):  # [B, T, ...] -> [n_blocks, B, bq, ...]
        x = _pad_to(x, 1, T_pad, value)
        return jnp.moveaxis(x.reshape(B, n_blocks, bq, *x.shape[2:]), 1, 0)

    def one_block(xs):
        qb, wb, qpb, qsb = xs
        valid = _valid_keys(qpb, kp, k_ok, qsb, k_seg)  # [B, bq, S]
        scores = _weighted_relu(qb, k, wb)
        keep = None
        if hier is not None:
            k_bar, count = hier
            nb = k_bar.shape[1]
            candidate = _candidate_blocks(qpb, count, cfg)
            chosen = _chosen_blocks(_weighted_relu(qb, k_bar, wb), candidate, nb, cfg)
            keep = _hi_keep(chosen, valid.sum(-1) <= K, qpb, kp, nb, cfg)
        values = _values(scores, valid, keep, qpb, kp, cfg)
        if values.shape[-1] < K:
            values = _pad_to(values, 2, K, -jnp.inf)
        vals, idx = jax.lax.top_k(values, K)
        return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)

    out = jax.lax.map(one_block, (blocks(q, 0), blocks(w, 0), blocks(qp, -1), blocks(q_seg, 0)))
    return jnp.moveaxis(out, 0, 1).reshape(B, T_pad, K)[:, :T]


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

    The running set holds only lower key indices and is itself ordered (value descending, index ascending), so
    putting it first makes lax.top_k's lower-position-wins tie rule the lower-key-index-wins rule.
    """
    vals = jnp.concatenate([run_vals, tile_vals], axis=1)
    idx = jnp.concatenate([run_idx, tile_idx], axis=1)
    top_vals, pos = jax.lax.top_k(vals, K)
    return top_vals, jnp.take_along_axis(idx, pos, axis=1)


def _kernel(live_ref, q_ref, w_ref, qp_ref, qseg_ref, k_ref, kp_ref, kok_ref, kseg_ref, *rest,
            cfg: Config, bk: int, num_blocks: int):
    out_ref = rest[-1]
    K = cfg.index_topk
    q = q_ref[...].astype(jnp.float32)  # [bq, I, J]
    w = w_ref[...].astype(jnp.float32)  # [bq, I]
    qp, q_seg = qp_ref[...], qseg_ref[...]  # [bq]
    n_live = live_ref[0]
    bq = q.shape[0]

    def key_tile(kb):
        keys = pl.ds(kb * bk, bk)
        kp = kp_ref[keys]
        valid = _valid_keys(qp, kp, kok_ref[keys] != 0, q_seg, kseg_ref[keys])  # [bq, bk]
        return keys, kp, valid

    keep_rule = None
    if num_blocks:  # HI: block stage once per query block, then a count pass for the dense rule
        kbar_ref, count_ref = rest[0], rest[1]
        candidate = _candidate_blocks(qp, count_ref[...], cfg)  # [bq, NB_pad]
        chosen = _chosen_blocks(_tile_scores(q, kbar_ref[...], w), candidate, num_blocks, cfg)
        n_valid = jax.lax.fori_loop(0, n_live, lambda kb, n: n + key_tile(kb)[2].sum(axis=1, dtype=jnp.int32),
                                    jnp.zeros((bq,), jnp.int32))
        keep_rule = functools.partial(_hi_keep, chosen, n_valid <= K, qp, num_blocks=num_blocks, cfg=cfg)

    def merge_tile(kb, carry):
        keys, kp, valid = key_tile(kb)
        scores = _tile_scores(q, k_ref[keys, :].astype(jnp.float32), w)
        keep = keep_rule(kp) if keep_rule is not None else None
        values = _values(scores, valid, keep, qp, kp, cfg)
        tile_idx = jnp.broadcast_to(kb * bk + jnp.arange(bk, dtype=jnp.int32), (bq, bk))
        return _merge_topk(*carry, values, tile_idx, K)

    init = (jnp.full((bq, K), -jnp.inf, jnp.float32), jnp.zeros((bq, K), jnp.int32))
    vals, idx = jax.lax.fori_loop(0, n_live, merge_tile, init)
    out_ref[...] = jnp.where(vals == -jnp.inf, -1, idx)


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

    # Key blocks to visit per query block: up to the last one holding a valid key at or before the block's
    # largest query position ([B, nqb, nkb] booleans, linear in T*S / (bq*bk)).
    k_min = jnp.where(k_ok, kp, _INT_MAX).reshape(B, nkb, bk).min(axis=-1)
    q_max = qp.reshape(B, nqb, bq).max(axis=-1)
    reachable = k_min[:, None, :] <= q_max[:, :, None]
    n_live = jnp.max(jnp.where(reachable, jnp.arange(1, nkb + 1, dtype=jnp.int32), 0), axis=-1)

    def per_query(*tail):  # rows of this query block
        return pl.BlockSpec((None, bq, *tail), lambda b, i: (b, i) + (0,) * len(tail))

    def whole(*shape):  # the batch row's full key axis; the kernel slices key tiles itself
        return pl.BlockSpec((None, *shape), lambda b, i: (b,) + (0,) * len(shape))

    in_specs = [
        pl.BlockSpec((None, 1), lambda b, i: (b, i)),
        per_query(I, J), per_query(I), per_query(), per_query(),
        whole(S_pad, J), whole(S_pad), whole(S_pad), whole(S_pad),
    ]
    inputs = [n_live, q, w, qp, q_seg, k, kp, k_ok.astype(jnp.int32), k_seg]
    num_blocks = 0
    if hier is not None:
        k_bar, count = hier
        num_blocks = k_bar.shape[1]
        nb_pad = _next_pow2(num_blocks)  # padded blocks have count 0, so they are never candidates
        inputs += [_pad_to(k_bar, 1, nb_pad, 0.0), _pad_to(count, 1, nb_pad, 0)]
        in_specs += [whole(nb_pad, J), whole(nb_pad)]

    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, bk=bk, num_blocks=num_blocks),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, K), jnp.int32),
        grid=(B, nqb),
        in_specs=in_specs,
        out_specs=per_query(K),
        interpret=interpret(),
    )(*inputs)
    return out[:, :T]


__all__ = ["select"]
