"""Lightning indexer and LongCat Sparse Attention selection (docs/architecture.md#lsa).

The indexer scores every causal key s for every query t,
    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])        (j over indexer heads, docs/architecture.md#indexer)
and LSA turns those scores into K = index_topk key indices per query:
  dense   at most K valid keys: take them all, so sparse attention is exactly dense (docs/architecture.md#si);
  SI      sinks {pos < init} and the local window {pos > t - local} are forced in with +inf, then top-K;
          off = the plain DSA token top-k;
  HI      mean-pooled block keys give a coarse block score; tokens are scored only inside the best
          hi_top_blocks blocks of the non-streaming region, then the SI rule runs (a design choice,
          docs/architecture.md#hi);
  CLI     the reuse sublayer takes its owner's indices; no code here (block.py threads them).
This is the reference path: it materialises [B, T, S] scores, and `select` is the reference of the fused
kernel `pallas_kernels.indexer_topk.select`. The scores, the SI forced set, the top-K rule and the HI block
means are `longcat_jax.ops` functions the kernel uses too. Indices point into the key axis of the given keys
(a cache slot, not a position), -1 marks an empty slot, and ties go to the lowest key index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.layers import apply_rope, config_inv_freq, param, rms_norm
from longcat_jax.ops.block_keys import block_keys
from longcat_jax.ops.indexer_scores import indexer_scores, weighted_relu_scores
from longcat_jax.ops.lsa_rules import forced_keys, top_k_indices, use_hierarchical
from longcat_jax.ops.masks import attention_mask


class Indexer(nnx.Module):
    """Lightning-indexer weights of one owner sublayer (docs/architecture.md#indexer); `project` gives q, k
    and head weights."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        pd, D, I, J = cfg.jnp_param_dtype, cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = param(rngs, (cfg.q_lora_rank, I, J), ("q_lora", "indexer_heads", "head_dim"), pd)
        self.wk = param(rngs, (D, J), ("embed", "head_dim"), pd)
        self.k_norm = param(None, (J,), ("head_dim",), pd, init="ones")
        # weights_proj stays fp32 whatever the model dtype (docs/architecture.md#indexer;
        # HF _keep_in_fp32_modules).
        self.weights_proj = param(rngs, (D, I), ("embed", "indexer_heads"), jnp.float32)
        self.cfg = cfg

    def project(self, x, c_q, positions):
        """x [B,T,D] normed attention input, c_q [B,T,Rq] unscaled MLA query latent, positions int [B,T].

        Returns q [B,T,I,J], k [B,T,J], w [B,T,I], all float32.
        """
        return indexer_project(x, c_q, positions, self.wq_b[...], self.wk[...], self.k_norm[...],
                               self.weights_proj[...], self.cfg)


def indexer_project(x, c_q, positions, wq_b, wk, k_norm, weights_proj, cfg: Config):
    """Indexer queries, keys and head weights (docs/architecture.md#indexer).

    Args:
      x: [B, T, D] normed attention input. c_q: [B, T, Rq] MLA query latent, before the alpha_q scale
        (HF convention; the scale would only multiply all scores by a positive constant,
        docs/architecture.md#indexer).
      positions: int [B, T]. wq_b [Rq, I, J], wk [D, J], k_norm [J], weights_proj [D, I].
    Returns:
      q [B, T, I, J], k [B, T, J] (RMS-normed), both with RoPE on dims [0:qk_rope_head_dim] (rope part
      first, nope part second), and w [B, T, I] = weights_proj(x) * I^-0.5 * J^-0.5, all float32. The J^-0.5
      score scale lives in w because ReLU(c z) = c ReLU(z) for c > 0, so the scores equal HF's
      sum_j w_hf ReLU(q.k J^-0.5).
    """
    dt, r = cfg.jnp_dtype, cfg.qk_rope_head_dim
    I, J = wq_b.shape[1:]
    q = jnp.einsum("btr,rij->btij", c_q.astype(dt), wq_b.astype(dt)).astype(jnp.float32)
    k = jnp.einsum("btd,dj->btj", x.astype(dt), wk.astype(dt)).astype(jnp.float32)
    k = rms_norm(k, k_norm.astype(jnp.float32), cfg.index_k_norm_eps)
    inv_freq = config_inv_freq(cfg)
    interleaved = cfg.indexer_rope_interleave
    q = jnp.concatenate([apply_rope(q[..., :r], positions, inv_freq, interleaved), q[..., r:]], axis=-1)
    k = jnp.concatenate([apply_rope(k[..., :r], positions, inv_freq, interleaved), k[..., r:]], axis=-1)
    w = jnp.einsum("btd,di->bti", x.astype(jnp.float32), weights_proj.astype(jnp.float32))
    w = w * (I**-0.5 * J**-0.5)
    return q, k, w


def select_topk(scores, q_positions, k_positions, cfg: Config, k_valid=None):
    """Token-level LSA selection (docs/architecture.md#si): indices int32 [B,T,K], K = cfg.index_topk,
    -1 in empty slots.

    With at most K valid causal keys every one of them is chosen (exact dense). Otherwise, with
    cfg.si_enabled, the forced set gets +inf so it always sits inside the K slots and the rest are the highest
    scores; with SI off this is the plain DSA top-k. Validity is recomputed from the positions, so `scores`
    may be unmasked.
    """
    valid = attention_mask(q_positions, k_positions, k_valid)
    if cfg.si_enabled:
        scores = jnp.where(forced_keys(q_positions, k_positions, cfg), jnp.inf, scores)
    # The dense rule needs no branch: valid scores are finite, so top-K takes them all when there are <= K.
    return top_k_indices(jnp.where(valid, scores, -jnp.inf), cfg.index_topk)


def select_topk_hierarchical(scores, q, k, w, q_positions, k_positions, cfg: Config, k_valid=None, *,
                             pool_valid=None):
    """HI selection (docs/architecture.md#hi): coarse block scores, token scores inside the best blocks, then
    the SI rule.

    A block is a candidate for query t when it holds a non-streaming key (init <= pos <= t - local; with SI
    off, init = local = 0) and ends at or before t; keys of the query's own incomplete block compete as
    tokens. Because index_local_tokens >= hi_block_size (a Config invariant), every block that holds a
    non-streaming key has already ended, so no block mean contains a future key and every non-streaming token
    is covered. The block score is sum_j w[t,j] ReLU(q[t,j] . k_bar_b) with the query's own q and w; the top
    cfg.hi_top_blocks candidates keep their tokens' scores and all other non-forced tokens drop to -inf (a row
    may fill fewer than K slots when the chosen blocks hold too few tokens). Rows with at most K valid keys
    stay exact dense. Key positions must lie in [0, S) (see `block_keys`).

    scores [B,T,S] token scores (from `indexer_scores`), q [B,T,I,J], k [B,S,J], w [B,T,I]; pool_valid bool
    [B,S]: the keys the block means pool, by default k_valid when it is [B,S], else every key. Returns int32
    [B,T,K].
    """
    Bh, K = cfg.hi_block_size, cfg.index_topk
    # Without SI there is no streaming region: every complete past block competes.
    init, local = (cfg.index_init_tokens, cfg.index_local_tokens) if cfg.si_enabled else (0, 0)
    # Block means pool whole rows (the valid keys); a per-query mask (packed documents) is applied to the
    # tokens afterwards.
    if pool_valid is None and k_valid is not None and k_valid.ndim == 2:
        pool_valid = k_valid
    k_bar, count = block_keys(k, k_positions, Bh, pool_valid)
    nb = k_bar.shape[1]
    start = jnp.arange(nb, dtype=jnp.int32) * Bh  # [NB] first absolute position of each block
    end = start + Bh - 1
    qp = q_positions[:, :, None]  # [B, T, 1]
    candidate = (
        (start[None, None, :] <= qp - local)
        & (end[None, None, :] >= init)
        & (end[None, None, :] <= qp)
        & (count[:, None, :] > 0)
    )  # [B, T, NB]
    block_scores = jnp.where(candidate, weighted_relu_scores(q, k_bar, w), -jnp.inf)
    m = min(cfg.hi_top_blocks, nb)
    _, top_blocks = jax.lax.top_k(block_scores, m)  # [B, T, M]; -inf picks are dropped by `& candidate`
    B, T, _ = candidate.shape
    chosen = jnp.zeros_like(candidate).at[
        jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], top_blocks
    ].set(True) & candidate
    # Token s inherits its block's decision; out-of-range positions fall to block "nb" = not chosen.
    tok_block = jnp.clip(k_positions // Bh, 0, nb)  # [B, S]
    chosen_ext = jnp.concatenate([chosen, jnp.zeros_like(chosen[..., :1])], axis=-1)
    tok_block = jnp.broadcast_to(tok_block[:, None, :], scores.shape)  # [B, T, S]
    in_chosen = jnp.take_along_axis(chosen_ext, tok_block, axis=-1)
    valid = attention_mask(q_positions, k_positions, k_valid)
    dense_row = valid.sum(axis=-1, keepdims=True) <= K
    # Keys of the query's own, still incomplete block have no block mean yet; they compete token by token
    # (under SI they sit inside the local window anyway).
    current_block = k_positions[:, None, :] >= (qp // Bh) * Bh
    keep = in_chosen | current_block | dense_row
    if cfg.si_enabled:
        keep = keep | forced_keys(q_positions, k_positions, cfg)
    return select_topk(jnp.where(keep, scores, -jnp.inf), q_positions, k_positions, cfg, k_valid)


def select(q, k, w, q_positions, k_positions, cfg: Config, k_valid=None, *, q_segment_ids=None,
           k_segment_ids=None):
    """The model's entry point: indices int32 [B,T,K] from the indexer outputs, dispatching dense / SI / HI.

    q [B,T,I,J], k [B,S,J], w [B,T,I] (from `Indexer.project`; k may be the indexer-key cache),
    q_positions [B,T], k_positions [B,S], k_valid bool [B,S], [B,T,S] or None. q_segment_ids [B,T] and
    k_segment_ids [B,S], both or neither: packed documents, a key counts for a query only in its document,
    while HI's block means still pool every key k_valid [B,S] admits (so a padding key, invalid in k_valid,
    pools in no block), as `pallas_kernels.indexer_topk.select` takes them. HI (when cfg.hi_enabled and
    S > cfg.hi_min_len) needs key positions in [0, S).
    """
    pool_valid = k_valid if k_valid is not None and k_valid.ndim == 2 else None
    if q_segment_ids is not None:
        same_doc = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
        if k_valid is not None:
            same_doc = same_doc & (k_valid[:, None, :] if k_valid.ndim == 2 else k_valid)
        k_valid = same_doc
    scores = indexer_scores(q, k, w, q_positions, k_positions, k_valid)
    if use_hierarchical(cfg, k.shape[1]):
        return select_topk_hierarchical(scores, q, k, w, q_positions, k_positions, cfg, k_valid,
                                        pool_valid=pool_valid)
    return select_topk(scores, q_positions, k_positions, cfg, k_valid)


__all__ = ["Indexer", "indexer_project", "select_topk", "select_topk_hierarchical", "select"]
