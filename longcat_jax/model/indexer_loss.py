"""The indexer's KL distillation loss (docs/architecture.md#indexer-training).

The indexer learns to predict where the main attention looks: for each query t,
    KL( p_t || softmax(I_t) )
where p_t is the main attention averaged over heads (L1-normalised, no gradient) and I_t the indexer logits
computed from detached inputs, so the indexer learns only from this loss and the model only from its own.
  dense warm-up: over every causal key;
  sparse stage:  over the selected set S_t only (both distributions renormalised there).
Cross-layer indexing: an owner's target is the average of the attention of every sublayer that uses its
indices (IndexCache's training-aware objective, docs/architecture.md#indexer-training); the MTP indexer's
target averages its 3 steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longcat_jax.ops.masks import attention_mask, indices_to_mask
from longcat_jax.ops.query_blocks import merge_queries, split_queries

_MASKED = -1e9  # finite, so masked entries contribute exactly 0 and no NaN reaches the gradient


def indexer_kl(scores, target, allowed, query_mask=None):
    """Mean over queries of KL(target || softmax(scores)) restricted to `allowed` keys.

    scores [B,T,S] indexer logits (may hold -inf), target [B,T,S] attention probabilities,
    allowed bool [B,T,S], query_mask [B,T] (1 = the query counts). Returns a scalar f32.
    """
    return query_mean(kl_rows(scores, target, allowed), query_mask)


def kl_rows(scores, target, allowed):
    """Per query KL(target || softmax(scores)) over the allowed keys, f32 [B,T];
    `indexer_kl` before the mean."""
    allowed = allowed & jnp.isfinite(scores)
    logits = jnp.where(allowed, scores.astype(jnp.float32), _MASKED)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.where(allowed, jax.lax.stop_gradient(target).astype(jnp.float32), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def attention_recall(target, selected, query_mask=None):
    """Share of the main attention mass that falls on the selected keys
    (1.0 = the selection misses nothing)."""
    return query_mean(recall_rows(target, selected), query_mask)


def recall_rows(target, selected):
    """Per query share of the attention mass `target` [B,T,S] on the `selected` keys, f32 [B,T]."""
    return jnp.sum(jnp.where(selected, target, 0.0), axis=-1) / jnp.maximum(target.sum(-1), 1e-30)


def query_mean(values, query_mask=None):
    """Mean of per-query values [B,T] over the queries that count (query_mask [B,T], 1 = counts)."""
    if query_mask is None:
        return values.mean()
    w = query_mask.astype(jnp.float32)
    return (values * w).sum() / jnp.maximum(w.sum(), 1.0)


def selection_recall(q_lat, q_rope, c_kv, k_rope, indices, scale, q_positions, k_positions, *, k_valid=None,
                     segment_ids=None, query_mask=None, block_q: int = 128):
    """Share of the dense causal attention mass that falls on the selected keys, head-averaged.

    The same number as `attention_recall(dense head-mean probs, selected)`, computed one block of queries at a
    time (memory O(block_q x S), not O(T x S)), so the sparse stage and the kernel path, which never form the
    dense attention, can still report how much of it their selection keeps. Per head the selected mass is
    exp(lse over the selected keys - lse over every allowed key), and each head's probabilities sum to one.

    q_lat [B,T,N,R] (absorbed queries), q_rope [B,T,N,Hr], c_kv [B,S,R], k_rope [B,S,Hr]; indices int [B,T,K]
    key rows (-1 = none); q_positions [B,T] / k_positions [B,S]; k_valid bool [B,S]; segment_ids [B,T] packed
    documents of a self-attention row (S == T); query_mask [B,T]. Returns a scalar f32. A block holds a few
    [B, block_q, N, S] f32 arrays (`block._measured_recall` uses the default 128).
    """
    B, T = q_positions.shape
    S = k_positions.shape[1]
    blocks = functools.partial(split_queries, block_q=block_q)
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
    k_seg = seg if segment_ids is not None else jnp.ones((B, S), jnp.int32)
    k_ok = jnp.ones((B, S), bool) if k_valid is None else k_valid
    c_kv, k_rope = c_kv.astype(jnp.float32), k_rope.astype(jnp.float32)

    def block_mass(args):
        ql, qr, idx, qp, qs = args
        scores = (jnp.einsum("btnr,bsr->btns", ql.astype(jnp.float32), c_kv)
                  + jnp.einsum("btnh,bsh->btns", qr.astype(jnp.float32), k_rope)) * scale
        allowed = attention_mask(qp, k_positions, k_ok[:, None, :] & (k_seg[:, None, :] == qs[..., None]))
        selected = allowed & indices_to_mask(idx, S)
        lse_all = jax.nn.logsumexp(jnp.where(allowed[:, :, None], scores, -jnp.inf), axis=-1)
        lse_sel = jax.nn.logsumexp(jnp.where(selected[:, :, None], scores, -jnp.inf), axis=-1)
        mass = jnp.exp(lse_sel - jnp.where(jnp.isfinite(lse_all), lse_all, 0.0))  # 0 where nothing selected
        return jnp.where(allowed.any(-1), mass.mean(-1), 0.0)  # [B, bq]; queries with no key count 0

    per_block = (blocks(q_lat), blocks(q_rope), blocks(indices, fill=-1), blocks(q_positions, fill=-1),
                 blocks(seg, fill=-1))
    return query_mean(merge_queries(jax.lax.map(block_mass, per_block), T), query_mask)
