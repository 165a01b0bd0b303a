"""SI's local window as a contiguous band: LSA's "contiguous KV ~50% budget" + "non-contiguous KV" split
(docs/architecture.md#lsa).

Under SI every query's selection holds its local window: the keys at positions p - W + 1 .. p of its
document, which lie in consecutive rows. `indexer_topk.select(..., window_apart=True)` leaves them out (K - W
slots) and `sparse_mla(..., window=W)` takes the window as W leading slots *by offset*:

  slots[..., :W]   slot r of query t is key row q_offset + t - W + 1 + r when that key is in the window of
                   the query's document, else -1 (`window_indices`)
  slots[..., W:]   the rest of the selection, gathered row by row

so the XLA path reads each query chunk's window as one band of rows shared by the chunk (a matmul, coalesced
reads) instead of gathering them per query. `window_indices` + the window-apart selection is the full
selection's key set whenever positions count up by one along a document (how the model packs rows and
fills its cache), so the window of a query is the run of rows just before it.
"""

from __future__ import annotations

import jax.numpy as jnp

from longcat_jax.config import Config
from pallas_kernels import indexer_topk


def window_size(cfg: Config) -> int:
    """The window read as a band: SI's local window, or 0 without SI (no window is forced in)."""
    return cfg.index_local_tokens if cfg.si_enabled else 0


def select(q, k, w, q_positions, k_positions, cfg: Config, q_offset=0, *, k_valid=None, q_segment_ids=None,
           k_segment_ids=None, impl: str = "auto"):
    """An indexer owner's key indices in the layout `sparse_mla(..., window=window_size(cfg))` takes: under SI
    [window by offset | the window-apart selection], otherwise `indexer_topk.select`'s K slots. Arguments as
    in `indexer_topk.select`, plus q_offset as in `window_indices`."""
    W = window_size(cfg)
    segments = {"q_segment_ids": q_segment_ids, "k_segment_ids": k_segment_ids}
    sel = indexer_topk.select(q, k, w, q_positions, k_positions, cfg, k_valid=k_valid, window_apart=bool(W),
                              impl=impl, **segments)
    if not W:
        return sel
    in_window = window_indices(q_positions, k_positions, W, q_offset, k_valid=k_valid, **segments)
    return jnp.concatenate([in_window, sel], axis=-1)


def window_indices(q_positions, k_positions, window: int, q_offset=0, *, k_valid=None, q_segment_ids=None,
                   k_segment_ids=None):
    """int32 [B,T,W]: the key rows of each query's SI window by offset (see the module docstring), -1 where
    that row is not a valid window key (before the sequence, another document, k_valid False, or a
    position outside p - W + 1 .. p).

    q_positions int [B,T], k_positions int [B,S]; q_offset: key row of query 0, an int or int [B] (0 for
    self-attention, the cache length with a cache); k_valid bool [B,S]; segment ids int [B,T] / [B,S], both or
    neither.
    """
    B, T = q_positions.shape
    S, W = k_positions.shape[1], window
    first = jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1, 1, 1)) - (W - 1)
    rows = first + jnp.arange(T, dtype=jnp.int32)[:, None] + jnp.arange(W, dtype=jnp.int32)
    rows = jnp.broadcast_to(rows, (B, T, W))
    safe = jnp.clip(rows, 0, S - 1).reshape(B, T * W)

    def at_rows(x):
        return jnp.take_along_axis(x, safe, axis=1).reshape(B, T, W)

    kp, qp = at_rows(k_positions), q_positions[..., None]
    ok = (rows >= 0) & (rows < S) & (kp > qp - W) & (kp <= qp)
    if k_valid is not None:
        ok = ok & at_rows(k_valid)
    if q_segment_ids is not None:
        ok = ok & (at_rows(k_segment_ids) == q_segment_ids[..., None])
    return jnp.where(ok, rows, -1).astype(jnp.int32)


def band_valid(window_slots, block_q: int):
    """bool [B, bq, W + bq]: which rows of a query chunk's band each query attends.

    The band of a chunk whose first query sits at key index qc holds keys qc - W .. qc + bq - 1; query t of
    the chunk reads band row j = t + 1 + r for its window slot r. window_slots int [B, bq, W] (-1 = not
    selected).
    """
    W = window_slots.shape[-1]
    t = jnp.arange(block_q)[:, None]
    r = jnp.arange(W + block_q)[None, :] - t - 1  # [bq, W + bq]
    in_range = (r >= 0) & (r < W)
    picked = jnp.take_along_axis(window_slots, jnp.broadcast_to(jnp.clip(r, 0, W - 1), window_slots.shape[:1]
                                                                + r.shape), axis=-1)
    return in_range & (picked >= 0)


def from_band(band, block_q: int, window: int):
    """[..., bq, W + bq] per band row -> [..., bq, W] per window slot (row j = t + 1 + r)."""
    j = jnp.arange(block_q)[:, None] + 1 + jnp.arange(window)[None, :]
    return jnp.take_along_axis(band, jnp.broadcast_to(j, band.shape[:-1] + (window,)), axis=-1)
