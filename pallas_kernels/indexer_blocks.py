"""Block-aligned ("hardware-aligned") LSA selection (docs/architecture.md#block-selection): whole key blocks,
not single tokens.

Key block b holds the key positions [b * block_size, (b + 1) * block_size). For query t
    block_score[t, b] = max of the lightning-indexer scores I[t, s] (`ops.indexer_scores`,
                        docs/architecture.md#indexer) over the keys s of block b that are valid for t
                        (causal, k_valid); -inf if there is none;
    SI (cfg.si_enabled): a block holding a valid sink (pos < index_init_tokens) or a valid key of the
                        local window (pos > t - index_local_tokens) scores +inf, i.e. the forced set is
                        rounded out to whole blocks;
and the top K / block_size blocks (K = cfg.index_topk, ties to the lower block) are chosen. Each chosen
block, in score order, becomes its block_size key indices in ascending order, with -1 for keys that are not
valid for the query (future, k_valid False, beyond S). A sparse attention kernel can then read whole
contiguous tiles (NSA / FlashMLA-style paged access). When k_valid marks a prefix of the rows (a linear
cache, right padding) a query's valid keys are a prefix, so a row with at most K valid keys touches at most
K / block_size blocks and covers every valid key: exact dense, as in docs/architecture.md#si. (With holes
in k_valid a short row can touch more blocks than fit; it then keeps the best of them.)

Key positions must be the slot index 0..S-1 (training from position 0, or a linear cache whose unwritten
rows are masked by k_valid [B, S]); packed documents with restarting positions need the token-level
selection. This is checked when k_positions is a concrete array; under jit it is assumed.

Reference: `pallas_kernels.indexer_blocks.select_blocks_reference`, beside the kernel because the model has no
block-aligned selection path of its own; it scores with `longcat_jax.ops.indexer_scores`.

Implementations (`impl`, see pallas_kernels/impl.py):
  select_blocks_reference  the plain dense definition; materialises the [B, T, S] scores. The test oracle.
  "xla"     lax.map over query blocks and, inside, over key chunks: the largest intermediates are the
            [B, query_block, I, key_chunk] logits and the [B, query_block, S / block_size] block scores.
  "pallas"  one program per (batch row, query block) streams the keys in tiles of exactly block_size rows,
            takes the masked max of each tile's scores and keeps a running top-(K / block_size) of
            (score, block) pairs: program memory is O(query_block * (K / block_size + block_size)).
            The wrapper sorts the chosen blocks and expands them to key indices (O(T * K)).
Written for the Pallas Triton backend (full-row refs sliced with pl.ds, power-of-two tiles, f32 dots);
only run here with interpret=True on CPU, GPU lowering is unverified. tl.dot wants tiles of at least 16,
so GPU use needs block_size >= 16 and an indexer head dim >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from longcat_jax.config import Config
from longcat_jax.ops.indexer_scores import indexer_scores
from longcat_jax.ops.lsa_rules import forced_keys
from longcat_jax.ops.masks import attention_mask
from pallas_kernels.impl import compiler_params, interpret, resolve
from pallas_kernels.tile_dot import tile_dot


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(q, k, w, q_positions, k_positions, k_valid, cfg: Config, block_size: int) -> int:
    """Validate the inputs; returns the number of blocks chosen per query, K / block_size."""
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
        raise ValueError(f"want q [B,T,I,J], k [B,S,J], w [B,T,I]; got {q.shape}, {k.shape}, {w.shape}")
    B, T, I, J = q.shape
    S = k.shape[1]
    if k.shape != (B, S, J) or w.shape != (B, T, I):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, w {w.shape}")
    if q_positions.shape != (B, T) or k_positions.shape != (B, S):
        raise ValueError(f"want q_positions [B,T]={B, T} and k_positions [B,S]={B, S}; "
                         f"got {q_positions.shape}, {k_positions.shape}")
    if k_valid is not None and k_valid.shape != (B, S):
        raise ValueError(f"k_valid must be [B,S]={B, S} (per-query masks need token-level selection); "
                         f"got {k_valid.shape}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    K = cfg.index_topk
    if K % block_size:
        raise ValueError(f"index_topk {K} must be a multiple of block_size {block_size}")
    n_sel = K // block_size
    if cfg.si_enabled:
        # Worst case: the sinks' blocks plus every block a window of `local` consecutive positions can touch.
        sink_blocks = _cdiv(cfg.index_init_tokens, block_size)
        window_blocks = _cdiv(max(cfg.index_local_tokens - 1, 0), block_size) + 1
        if sink_blocks + window_blocks > n_sel:
            raise ValueError(
                f"SI forces up to {sink_blocks + window_blocks} blocks of {block_size} (sinks "
                f"{cfg.index_init_tokens}, window {cfg.index_local_tokens}) but only {n_sel} fit in K={K}; "
                "use a smaller block_size")
    if not isinstance(k_positions, jax.core.Tracer):
        slots = np.broadcast_to(np.arange(S), (B, S))
        if not np.array_equal(np.asarray(k_positions), slots):
            raise ValueError("block selection needs key positions equal to the slot index 0..S-1 "
                             "(training from 0 or a linear cache); use token-level selection otherwise")
    return n_sel


def _top_blocks(block_scores, n_sel: int):
    """(ids int32, scores) [B, T, n_sel] of the best blocks, value-descending, ties to the lower block."""
    nb = block_scores.shape[-1]
    if nb < n_sel:
        block_scores = jnp.pad(block_scores, ((0, 0), (0, 0), (0, n_sel - nb)), constant_values=-jnp.inf)
    vals, ids = jax.lax.top_k(block_scores, n_sel)
    return ids.astype(jnp.int32), vals


def _expand(block_ids, block_vals, q_positions, k_valid, num_keys: int, block_size: int):
    """Block ids [B,T,n_sel] -> key indices int32 [B,T,n_sel*block_size]; -1 for keys invalid for the query.

    A -inf block holds no valid key, so all of its slots become -1 whichever block it names.
    """
    B, T, n_sel = block_ids.shape
    keys = block_ids[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)  # [B, T, n_sel, bs]
    keys = keys.reshape(B, T, n_sel * block_size)
    live = jnp.repeat(block_vals > -jnp.inf, block_size, axis=-1)
    ok = live & (keys >= 0) & (keys < num_keys) & (keys <= q_positions[:, :, None])
    if k_valid is not None:
        safe = jnp.clip(keys, 0, num_keys - 1)
        ok = ok & k_valid[jnp.arange(B)[:, None, None], safe]
    return jnp.where(ok, keys, -1).astype(jnp.int32)


def _block_scores(scores, valid, forced, block_size: int):
    """Masked max per block [B, T', NB] from token scores/masks [B, T', S'] (S' a multiple of block_size).

    forced is None without SI; otherwise blocks holding a forced valid key get +inf.
    """
    B, Tq, Sk = scores.shape
    shape = (B, Tq, Sk // block_size, block_size)
    best = jnp.where(valid, scores, -jnp.inf).reshape(shape).max(-1)
    if forced is not None:
        best = jnp.where((forced & valid).reshape(shape).any(-1), jnp.inf, best)
    return best


def select_blocks_reference(q, k, w, q_positions, k_positions, cfg: Config, *, block_size: int, k_valid=None):
    """The dense definition of block selection (see the module docstring); int32 [B,T,K].

    Materialises the full [B, T, S] index scores: for tests and small problems only.
    """
    n_sel = _check(q, k, w, q_positions, k_positions, k_valid, cfg, block_size)
    S = k.shape[1]
    pad = _cdiv(S, block_size) * block_size - S
    grow = lambda x, v: jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=v)  # noqa: E731
    scores = grow(indexer_scores(q, k, w, q_positions, k_positions, k_valid), -jnp.inf)
    valid = grow(attention_mask(q_positions, k_positions, k_valid), False)
    forced = grow(forced_keys(q_positions, k_positions, cfg), False) if cfg.si_enabled else None
    ids, vals = _top_blocks(_block_scores(scores, valid, forced, block_size), n_sel)
    return _expand(ids, vals, q_positions, k_valid, S, block_size)


def select_blocks(q, k, w, q_positions, k_positions, cfg: Config, *, block_size: int, k_valid=None,
                  impl: str = "auto", query_block: int = 64, key_chunk: int = 256):
    """Block-aligned LSA selection: key indices int32 [B,T,K], K = cfg.index_topk, -1 in empty slots.

    q [B,T,I,J], k [B,S,J], w [B,T,I] from `Indexer.project` (k may be the indexer-key cache);
    q_positions [B,T]; k_positions [B,S] = the slot index; k_valid bool [B,S] or None. block_size divides K
    (a power of two for impl="pallas"); query_block is the number of queries per program / map step (rounded
    to a power of two); key_chunk (impl="xla") the keys scored per map step, rounded to whole blocks.
    Equal to `select_blocks_reference`.
    """
    impl = resolve(impl, mosaic=False)  # no TPU version: XLA there
    n_sel = _check(q, k, w, q_positions, k_positions, k_valid, cfg, block_size)
    if impl == "pallas" and block_size & (block_size - 1):
        raise ValueError(f"impl='pallas' streams power-of-two key tiles; block_size {block_size} is not one")
    if query_block < 1 or key_chunk < 1:
        raise ValueError(f"query_block and key_chunk must be positive, got {query_block}, {key_chunk}")
    B, T = q_positions.shape
    S = k.shape[1]
    bq = min(pl.next_power_of_2(query_block), pl.next_power_of_2(T))
    t_pad = _cdiv(T, bq) * bq - T
    # Padded queries sit at position -1: no key is valid for them, and their rows are cut off below.
    qpos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, t_pad)), constant_values=-1)
    qp = jnp.pad(q, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    wp = jnp.pad(w, ((0, 0), (0, t_pad), (0, 0)))
    valid_rows = jnp.ones((B, S), bool) if k_valid is None else k_valid.astype(bool)
    if impl == "pallas":
        ids, vals = _select_pallas(qp, k, wp, qpos, valid_rows, cfg, block_size, n_sel, bq)
    else:
        ids, vals = _select_xla(qp, k, wp, qpos, valid_rows, cfg, block_size, n_sel, bq, key_chunk)
    return _expand(ids[:, :T], vals[:, :T], q_positions, k_valid, S, block_size)


def _select_xla(q, k, w, qpos, k_valid, cfg: Config, block_size: int, n_sel: int, bq: int, key_chunk: int):
    """Chosen (ids, scores) [B, T, n_sel]: lax.map over query blocks, and over key chunks inside each."""
    B, T, I, J = q.shape
    S = k.shape[1]
    chunk = max(1, key_chunk // block_size) * block_size
    chunk = min(chunk, _cdiv(S, block_size) * block_size)
    n_chunks = _cdiv(S, chunk)
    pad = n_chunks * chunk - S
    k_chunks = jnp.pad(k, ((0, 0), (0, pad), (0, 0))).reshape(B, n_chunks, chunk, J).swapaxes(0, 1)
    v_chunks = jnp.pad(k_valid, ((0, 0), (0, pad))).reshape(B, n_chunks, chunk).swapaxes(0, 1)
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    nb = _cdiv(S, block_size)

    def one_query_block(args):
        qb, wb, qposb = args  # [B,bq,I,J], [B,bq,I], [B,bq]

        def one_key_chunk(kargs):
            kc, vc, start = kargs
            kpos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (B, chunk))
            scores = indexer_scores(qb, kc, wb, qposb, kpos, vc)
            valid = attention_mask(qposb, kpos, vc)
            forced = forced_keys(qposb, kpos, cfg) if cfg.si_enabled else None
            return _block_scores(scores, valid, forced, block_size)  # [B, bq, chunk / bs]

        per_chunk = jax.lax.map(one_key_chunk, (k_chunks, v_chunks, starts))  # [n_chunks, B, bq, chunk/bs]
        block_scores = per_chunk.transpose(1, 2, 0, 3).reshape(B, bq, -1)[..., :nb]
        return _top_blocks(block_scores, n_sel)

    split = lambda x: x.reshape(B, T // bq, bq, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    ids, vals = jax.lax.map(one_query_block, (split(q), split(w), split(qpos)))
    merge = lambda x: x.swapaxes(0, 1).reshape(B, T, n_sel)  # noqa: E731
    return merge(ids), merge(vals)


def _select_kernel(qpos_ref, q_ref, w_ref, k_ref, kvalid_ref, vals_ref, ids_ref, *, cfg: Config,
                   block_size: int, n_sel: int, num_blocks: int):
    """One (batch row, query block): stream key tiles, keep the best n_sel (score, block) pairs per query.

    The running set lives in `width` (a power of two >= n_sel) lanes; lanes >= n_sel are never used.
    Blocks arrive in ascending order, so a new block displaces the held one that is worst under
    (score desc, block asc) - lowest score, and among equal scores the highest block - only with a strictly
    higher score: ties keep the lower block, matching lax.top_k on the dense block scores.
    """
    bq, width = vals_ref.shape
    n_heads = q_ref.shape[1]
    qpos = qpos_ref[...]
    lane = jax.lax.broadcasted_iota(jnp.int32, (bq, width), 1)
    spare = lane >= n_sel
    offsets = jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)

    def visit_block(b, held):
        vals, ids = held
        k_tile = k_ref[pl.ds(b * block_size, block_size), :].astype(jnp.float32)  # [bs, J]
        kpos = b * block_size + offsets  # [1, bs]
        scores = jnp.zeros((bq, block_size), jnp.float32)
        for i in range(n_heads):
            logits = tile_dot(q_ref[:, i, :].astype(jnp.float32), k_tile, 1, 1)
            scores = scores + w_ref[:, i].astype(jnp.float32)[:, None] * jnp.maximum(logits, 0.0)
        valid = (kpos <= qpos[:, None]) & (kvalid_ref[pl.ds(b * block_size, block_size)][None, :] != 0)
        best = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1, keepdims=True)  # [bq, 1]
        if cfg.si_enabled:
            forced = (kpos < cfg.index_init_tokens) | (kpos > qpos[:, None] - cfg.index_local_tokens)
            any_forced = jnp.max((forced & valid).astype(jnp.int32), axis=1, keepdims=True) > 0
            best = jnp.where(any_forced, jnp.inf, best)
        worst = jnp.min(jnp.where(spare, jnp.inf, vals), axis=1, keepdims=True)
        is_worst = ~spare & (vals == worst)
        worst_id = jnp.max(jnp.where(is_worst, ids, -2), axis=1, keepdims=True)
        slot = jnp.min(jnp.where(is_worst & (ids == worst_id), lane, width), axis=1, keepdims=True)
        take = (lane == slot) & (best > worst)
        return jnp.where(take, best, vals), jnp.where(take, b, ids)

    # Blocks past the block of the last query position hold only future keys: skip them (causal skipping).
    live_blocks = jnp.clip(jnp.max(qpos) // block_size + 1, 0, num_blocks)
    start = (jnp.full((bq, width), -jnp.inf, jnp.float32), jnp.full((bq, width), -1, jnp.int32))
    vals, ids = jax.lax.fori_loop(0, live_blocks, visit_block, start)
    vals_ref[...] = vals
    ids_ref[...] = ids


def _select_pallas(q, k, w, qpos, k_valid, cfg: Config, block_size: int, n_sel: int, bq: int):
    """Chosen (ids, scores) [B, T, n_sel] from the streaming kernel, sorted by (score desc, block asc)."""
    B, T, I, J = q.shape
    S = k.shape[1]
    nb = _cdiv(S, block_size)
    pad = nb * block_size - S
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(k_valid.astype(jnp.int32), ((0, 0), (0, pad)))  # padded keys are invalid
    width = pl.next_power_of_2(n_sel)
    kernel = functools.partial(_select_kernel, cfg=cfg, block_size=block_size, n_sel=n_sel, num_blocks=nb)
    row = lambda b, i: (b, i, 0)  # noqa: E731
    vals, ids = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, T, width), jnp.float32),
                   jax.ShapeDtypeStruct((B, T, width), jnp.int32)),
        grid=(B, T // bq),
        in_specs=[
            pl.BlockSpec((None, bq), lambda b, i: (b, i)),
            pl.BlockSpec((None, bq, I, J), lambda b, i: (b, i, 0, 0)),
            pl.BlockSpec((None, bq, I), row),
            pl.BlockSpec((None, nb * block_size, J), lambda b, i: (b, 0, 0)),
            pl.BlockSpec((None, nb * block_size), lambda b, i: (b, 0)),
        ],
        out_specs=(pl.BlockSpec((None, bq, width), row), pl.BlockSpec((None, bq, width), row)),
        compiler_params=compiler_params(),
        interpret=interpret(),
    )(qpos, q, w, kp, valid)
    vals, ids = vals[..., :n_sel], ids[..., :n_sel]
    neg, ids = jax.lax.sort((-vals, ids), dimension=-1, num_keys=2)
    return ids, -neg


__all__ = ["select_blocks", "select_blocks_reference"]
