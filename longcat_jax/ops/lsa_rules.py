"""Rules of LongCat Sparse Attention's key selection that the model's reference and the kernels share:
the keys SI forces in, when hierarchical indexing (HI) runs, and the top-K that writes -1 for empty picks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longcat_jax.config import Config


def local_window(q_positions, k_positions, cfg: Config):
    """SI's local window bool [..., T, S]: keys at pos > t - index_local_tokens (the query's own included),
    from q_positions [..., T] and k_positions [..., S]; leading dims broadcast (a batch, or a kernel tile)."""
    return k_positions[..., None, :] > q_positions[..., :, None] - cfg.index_local_tokens


def forced_keys(q_positions, k_positions, cfg: Config):
    """SI forced set F_t bool [..., T, S]: sinks (pos < index_init_tokens) and the local window.

    Callers intersect it with causality.
    """
    return (k_positions[..., None, :] < cfg.index_init_tokens) | local_window(q_positions, k_positions, cfg)


def use_hierarchical(cfg: Config, num_keys: int) -> bool:
    """HI runs only when switched on and the key length exceeds cfg.hi_min_len (a static shape test)."""
    return cfg.hi_enabled and num_keys > cfg.hi_min_len


def top_k_indices(values, K: int, idx=None):
    """int32 [..., K]: the K largest of values [..., N] as positions on the last axis, or, with idx [..., N],
    the entries of idx at those positions; -1 where the pick is -inf (no valid key).

    jax.lax.top_k puts the lower position first among equal values, the deterministic tie-break. Fewer than
    K values are padded with -inf, so the output is always K wide.
    """
    N = values.shape[-1]
    if N < K:
        values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, K - N)], constant_values=-jnp.inf)
    vals, pos = jax.lax.top_k(values, K)
    if idx is not None:
        pos = jnp.take_along_axis(idx, pos, axis=-1)
    return jnp.where(vals == -jnp.inf, -1, pos).astype(jnp.int32)
