"""Selection rules shared by both paths of `indexer_topk` (xla and the Pallas kernel), and small helpers.

A key's top-k value (the table in `indexer_topk`'s docstring) is built here from the same functions on both
paths: validity (causal, k_valid, same document), the SI forced set and the HI keep set around the chosen
blocks. Leading batch dims broadcast: [..., T] queries, [..., S] keys, so the same code serves a [B, bq, S]
block and a [bq, bk] tile. Only the kernel imports this file, so it stays beside it; what the model's
reference shares with both paths (the score contraction, the top-K with -1, the block means) is in
`longcat_jax.ops`.
"""

from __future__ import annotations

import jax.numpy as jnp

from longcat_jax.config import Config
from longcat_jax.ops.lsa_rules import forced_keys, local_window

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


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


def _window_start(qp, cfg: Config):
    """First position of a query's window: its own (incomplete) block and, under SI, its local window."""
    start = (qp // cfg.hi_block_size) * cfg.hi_block_size
    return jnp.minimum(start, qp - cfg.index_local_tokens + 1) if cfg.si_enabled else start


def _hi_keep(chosen, dense_row, qp, kp, num_blocks: int, cfg: Config):
    """bool [..., T, S]: tokens that may compete under HI (chosen block, own block, dense row;
    docs/architecture.md#hi).

    chosen int [..., T, M] block ids, dense_row bool [..., T]. A key's block is clipped to [0, NB] like the
    reference, NB meaning "no block"; -1 in `chosen` matches nothing.
    """
    Bh = cfg.hi_block_size
    tok_block = jnp.clip(kp // Bh, 0, num_blocks)[..., None, :, None]  # [..., 1, S, 1]
    # max over int, not any: Triton lowers no boolean reduction.
    in_chosen = jnp.max((tok_block == chosen[..., :, None, :]).astype(jnp.int32), axis=-1) > 0  # [..., T, S]
    current_block = kp[..., None, :] >= (qp[..., :, None] // Bh) * Bh
    return in_chosen | current_block | dense_row[..., :, None]


def _values(scores, valid, keep, qp, kp, cfg: Config, apart: bool = False):
    """Top-k key values (see `indexer_topk`'s docstring): -inf invalid, +inf forced, -inf outside the HI
    keep set; with `apart` the local window is -inf (left to the caller). qp [..., T] and kp [..., S]
    broadcast against scores [..., T, S]."""
    if keep is not None:
        scores = jnp.where(keep, scores, -jnp.inf)
    if cfg.si_enabled:
        scores = jnp.where(forced_keys(qp, kp, cfg), jnp.inf, scores)
        if apart:
            scores = jnp.where(local_window(qp, kp, cfg), -jnp.inf, scores)
    return jnp.where(valid, scores, -jnp.inf)


def _width(cfg: Config, apart: bool) -> int:
    """Slots of a selection: K, or K - local when the local window is kept apart."""
    return cfg.index_topk - cfg.index_local_tokens if apart else cfg.index_topk
