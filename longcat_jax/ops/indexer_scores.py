"""Lightning-indexer scores: how much query t wants key s,

    I[t, s] = sum_i w[t, i] * ReLU(q[t, i] . k[s])            (i over indexer heads)

in f32. The model's reference selection and the kernels score with the same contraction, so their scores
differ only where a backend sums in another order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longcat_jax.ops.masks import attention_mask


def weighted_relu_scores(q, k, w):
    """sum_i w[t,i] ReLU(q[t,i] . k[s]) in f32, unmasked: q [B,T,I,J], k [B,S,J], w [B,T,I] -> [B,T,S].

    k may be any rows of keys, e.g. the per-block mean keys of hierarchical indexing.
    """
    logits = jnp.einsum("btij,bsj->btis", q.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.einsum("bti,btis->bts", w.astype(jnp.float32), jax.nn.relu(logits))


def indexer_scores(q, k, w, q_positions, k_positions, k_valid=None):
    """Index scores I float32 [B,T,S]; -inf at future keys (k_pos > q_pos) and where k_valid is False.

    q [B,T,I,J], k [B,S,J], w [B,T,I] from `longcat_jax.model.indexer.indexer_project`; q_positions [B,T],
    k_positions [B,S] (keys may come from a cache, so positions are explicit); k_valid bool [B,S], [B,T,S]
    or None.
    """
    scores = weighted_relu_scores(q, k, w)
    return jnp.where(attention_mask(q_positions, k_positions, k_valid), scores, -jnp.inf)
