"""The indexer's KL distillation loss (SPEC 3.10, 7.3).

The indexer learns to predict where the main attention looks: for each query t,
    KL( p_t || softmax(I_t) )
where p_t is the main attention averaged over heads (L1-normalised, no gradient) and I_t the indexer logits
computed from detached inputs, so the indexer learns only from this loss and the model only from its own.
  dense warm-up: over every causal key;
  sparse stage:  over the selected set S_t only (both distributions renormalised there).
Cross-layer indexing: an owner's target is the average of the attention of every sublayer that uses its
indices (IndexCache's training-aware objective, SPEC 7.3); the MTP indexer's target averages its 3 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e9  # finite, so masked entries contribute exactly 0 and no NaN reaches the gradient


def indexer_kl(scores, target, allowed, query_mask=None):
    """Mean over queries of KL(target || softmax(scores)) restricted to `allowed` keys.

    scores [B,T,S] indexer logits (may hold -inf), target [B,T,S] attention probabilities, allowed bool [B,T,S],
    query_mask [B,T] (1 = the query counts). Returns a scalar f32.
    """
    allowed = allowed & jnp.isfinite(scores)
    logits = jnp.where(allowed, scores.astype(jnp.float32), _MASKED)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.where(allowed, jax.lax.stop_gradient(target).astype(jnp.float32), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)  # [B, T]
    if query_mask is None:
        return kl.mean()
    w = query_mask.astype(jnp.float32)
    return (kl * w).sum() / jnp.maximum(w.sum(), 1.0)


def attention_recall(target, selected, query_mask=None):
    """Share of the main attention mass that falls on the selected keys (1.0 = the selection misses nothing)."""
    mass = jnp.sum(jnp.where(selected, target, 0.0), axis=-1) / jnp.maximum(target.sum(-1), 1e-30)
    if query_mask is None:
        return mass.mean()
    w = query_mask.astype(jnp.float32)
    return (mass * w).sum() / jnp.maximum(w.sum(), 1.0)
