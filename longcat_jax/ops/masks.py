"""Boolean attention masks over (query, key) pairs, [B, T, S], and the masked softmax that applies them.

The model's attention, its indexer and the kernels' dense references all decide "may query t see key s" with
these, so a mask means the same thing on every path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_positions, k_positions, k_valid=None):
    """Causal mask bool [B,T,S] from absolute positions (k_pos <= q_pos).

    q_positions int [B,T], k_positions int [B,S]. k_valid is bool [B,S] (e.g. unwritten cache rows) or
    [B,T,S] (per query, e.g. the same packed document).
    """
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if k_valid is not None:
        mask = mask & (k_valid[:, None, :] if k_valid.ndim == 2 else k_valid)
    return mask


def indices_to_mask(indices, num_keys: int):
    """bool [B,T,S] with True at the selected keys (HF-style scatter); -1 slots select nothing.

    indices int [B,T,K]; the caller still ANDs this with the causal / validity mask.
    """
    # -1 must not wrap around to the last key: send it out of range and let the scatter drop it.
    safe = jnp.where(indices < 0, num_keys, indices)

    def one_query(slots):  # [K] -> [S]
        return jnp.zeros((num_keys,), bool).at[slots].set(True, mode="drop")

    # One scatter per (b, t) as batch dimensions, not iota coordinates: XLA then partitions it along a split
    # query axis (context parallelism) instead of gathering every query's indices.
    return jax.vmap(jax.vmap(one_query))(safe)


def softmax_f32(scores, mask):
    """Masked softmax over the last axis in f32; fully masked rows give zeros instead of NaN.

    scores [..., S] in any float dtype, mask bool broadcastable to it.
    """
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
    return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
