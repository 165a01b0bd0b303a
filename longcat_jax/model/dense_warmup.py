"""The indexer's dense warm-up in linear memory (docs/architecture.md#indexer-training): dense MLA attention
and the dense indexer KL, one block of queries at a time.

In the warm-up stage attention runs over every allowed key and the indexer learns the full head-mean attention
distribution. The reference path (`block.attention_sublayer`, cfg.kernel_impl "reference") forms the
[B, N, T, S] scores and the [B, T, S] target and logits: memory quadratic in T. On the kernel path the same
numbers come from here, each a `lax.map` over blocks of `block_q` queries under `jax.checkpoint`, so forward
and backward hold the scores of one block, O(block_q x S), at a time:

  dense_attention       absorbed MLA over every allowed key (as `mla.attend_absorbed` with the causal,
                        same-document mask);
  dense_indexer_stats   `indexer_loss.indexer_kl` over every allowed key against the mean attention of the
                        served sublayers, recomputed from their latents, and `indexer_loss.attention_recall`
                        of the owner's selection, in the same pass.

Plain JAX on every impl: the work stays quadratic, as dense attention's must; only the memory is linear. A
block holds a few [B, block_q, N, S] f32 arrays; `block.attention_sublayer` uses block_q = 128. Scores are
computed in the latents' dtype and normalised in f32, as on the reference path. Under context parallelism the
keys arrive all-gathered (`block._gather_keys`) and the queries split (docs/architecture.md#context-parallel).
Self-attention rows only (keys = the queries' own tokens, no cache): the warm-up is a training stage.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longcat_jax.model.indexer_loss import kl_rows, query_mean, recall_rows
from longcat_jax.model.mla import absorbed_scores
from longcat_jax.ops.indexer_scores import indexer_scores
from longcat_jax.ops.masks import attention_mask, indices_to_mask, softmax_f32
from longcat_jax.ops.query_blocks import merge_queries, split_queries


def _allowed(q_pos, q_seg, positions, segment_ids):
    """Causal, same-document keys of a block of queries: bool [B, bq, S]. A padding key (segment 0) is no
    document's, as on the reference path (`block.Context.query_mask`)."""
    if segment_ids is None:
        return attention_mask(q_pos, positions)
    same_doc = (segment_ids[:, None, :] == q_seg[..., None]) & (segment_ids[:, None, :] > 0)
    return attention_mask(q_pos, positions, same_doc)


def _head_mean_probs(keys, q_lat, q_rope, allowed, scale):
    """One sublayer's attention of a block of queries, averaged over heads: f32 [B, bq, S]. keys: its
    (c_kv [B,S,R], k_rope [B,S,Hr])."""
    return softmax_f32(absorbed_scores(q_lat, q_rope, *keys) * scale, allowed[:, None]).mean(axis=1)


def dense_attention(q_lat, q_rope, c_kv, k_rope, scale, positions, segment_ids=None, *, block_q: int = 128):
    """Absorbed MLA over every causal (and, packed, same-document) key; o_lat [B,T,N,R] in q_lat's dtype.

    q_lat [B,T,N,R] (`mla.absorb_query`), q_rope [B,T,N,Hr], c_kv [B,T,R], k_rope [B,T,Hr]; positions [B,T]
    RoPE positions (restarting in each packed document); segment_ids [B,T] document ids or None.
    """
    T, dt = positions.shape[1], q_lat.dtype
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside lax.map's loop, CSE cannot undo the remat
    def block(args):
        ql, qr, qp, qs = args
        scores = absorbed_scores(ql, qr, c_kv, k_rope) * scale
        p = softmax_f32(scores, _allowed(qp, qs, positions, segment_ids)[:, None])
        return jnp.einsum("bnts,bsr->btnr", p.astype(dt), c_kv)

    blocks = functools.partial(split_queries, block_q=block_q)
    per_block = (blocks(q_lat), blocks(q_rope), blocks(positions, fill=-1), blocks(seg, fill=-1))
    return merge_queries(jax.lax.map(block, per_block), T)


def dense_indexer_stats(index_qkw, served, indices, scale, positions, segment_ids=None, query_mask=None, *,
                        block_q: int = 128):
    """(KL, recall) of one indexer in the dense warm-up: the values of `indexer_kl(scores, mean served probs,
    allowed, query_mask)` and of the mean over served sublayers of `attention_recall(probs, selected,
    query_mask)`, as `block.indexer_aux` computes them on the reference path. Both scalars f32; the KL carries
    gradients to the indexer's q, k and w only, the recall none.

    index_qkw: the owner's (q [B,T,I,J], k [B,T,J], w [B,T,I]) from detached inputs. served: one tuple per
    sublayer that uses the owner's indices, (q_lat, q_rope, c_kv, k_rope) as for `dense_attention` (they get
    no gradient). indices int [B,T,K] the owner's selection (-1 empty). positions, segment_ids as for
    `dense_attention`; query_mask [B,T] (1 = the query counts).
    """
    q_i, k_i, w_i = index_qkw
    T = S = positions.shape[1]
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    served = [[jax.lax.stop_gradient(a) for a in lat] for lat in served]
    keys = [lat[2:] for lat in served]

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block(args):
        qi, wi, idx, qp, qs, queries = args
        allowed = _allowed(qp, qs, positions, segment_ids)
        probs = [_head_mean_probs(kv, *q, allowed, scale) for kv, q in zip(keys, queries)]
        target = sum(probs) / len(probs)
        kl = kl_rows(indexer_scores(qi, k_i, wi, qp, positions, allowed), target, allowed)
        selected = indices_to_mask(idx, S) & allowed
        # No gradient: its inputs have none.
        recall = sum(recall_rows(p, selected) for p in probs) / len(probs)
        return kl, recall

    blocks = functools.partial(split_queries, block_q=block_q)
    queries = [(blocks(lat[0]), blocks(lat[1])) for lat in served]
    per_block = (blocks(q_i), blocks(w_i), blocks(indices, fill=-1), blocks(positions, fill=-1),
                 blocks(seg, fill=-1), queries)
    kl, recall = jax.lax.map(block, per_block)
    return query_mean(merge_queries(kl, T), query_mask), query_mean(merge_queries(recall, T), query_mask)
