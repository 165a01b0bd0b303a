"""A decode step's LSA selection over the paged cache when HI applies: O(S / span) run sums (span =
gcd(page_size, hi_block_size), the page size by default) and O(hi_top_blocks * hi_block_size + K) keys read,
instead of several passes over all S keys (docs/architecture.md#hi, docs/architecture.md#paged-cache).

`paged_cache.select` over a sequence's gathered indexer keys reads all S of them several times: block means,
block scores, token scores, a top-K over S. For one new query per sequence HI's choice needs far less:
  block means    from the cache's run sums (`PagedCache.index_sum`) through the page table: a candidate block
                 has ended by the new token, so every row of it is written and its mean is its sum over
                 hi_block_size; the query's own block, which the new token may complete (a candidate without
                 SI), is summed from its gathered rows, the new key included;
  block choice   the top hi_top_blocks candidates by `weighted_relu_scores`, as `select_topk_hierarchical`;
  token scores   only for the keys that rule can pick (the chosen blocks, the query's own block and, under SI,
                 the forced set), gathered from the pages in position order without repeats, so that top-K
                 with its ties to the lower index picks what the reference picks over all S.
Rows of at most max(hi_min_len, index_topk) keys keep the reference rule over the pages that can hold them:
HI leaves them alone or, at most K keys, takes every key, as the flat rule does. Indices are positions in
the sequence, -1 in empty slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longcat_jax.config import Config
from longcat_jax.model import paged_cache
from longcat_jax.ops.indexer_scores import weighted_relu_scores
from longcat_jax.ops.lsa_rules import forced_keys, top_k_indices, use_hierarchical


class IndexPages(NamedTuple):
    """An indexer owner's keys in the paged cache, read in place by a decode step's selection."""

    pages: jax.Array  # [pools * P, page, J] every pool's key pages as they were before the step
    # [pools * P * runs, J] their run sums (`PagedCache.index_sum`, runs = page / span per page), row
    # p * runs + r for run r of page p: flat, as a pool with one run per page would otherwise carry a unit
    # axis, and XLA:CPU copies the whole pool into the selection's branch to change that axis's layout
    sums: jax.Array
    table: jax.Array  # int [B, W] each sequence's pages, numbered in `pages`
    new: jax.Array  # [B, J] the new token's key, not in the pages yet


def index_pages(index_k, index_sum, page_table, pool, new) -> IndexPages:
    """Pool `pool`'s keys as a decode step reads them: index_k [..., P, page, J] and index_sum
    [..., P, runs, J] (`PagedCache`), page_table [B, W] into that pool, the new keys [B, J]."""
    pages, table = paged_cache.pool_pages(index_k, page_table, pool)
    return IndexPages(pages, index_sum.reshape(-1, index_sum.shape[-1]), table, new)


def select(q, keys: IndexPages, w, q_positions, new_lens, cfg: Config):
    """`paged_cache.select` for one new query per sequence: int32 [B, 1, K] positions (-1 = empty slot), the
    keys that rule chooses over the sequence's gathered keys.

    q [B, 1, I, J], w [B, 1, I]; q_positions int [B], the new token's position (the sequence's cache length);
    new_lens int [B]: 1, or 0 for a padding row. HI switches on by each sequence's own length; a padding row's
    selection is never read, so it does not make its batch pay for both rules.
    """
    S = keys.table.shape[1] * keys.pages.shape[1]
    short = functools.partial(_short_select, q, keys, w, q_positions, new_lens, cfg)
    if not use_hierarchical(cfg, S):
        return short()
    long = q_positions + new_lens > max(cfg.hi_min_len, cfg.index_topk)
    active = new_lens > 0
    hi = functools.partial(_hi_select, q, keys, w, q_positions, cfg)
    # Only a batch that mixes short and long sequences pays for both selections
    branches = (short, hi, lambda: jnp.where(long[:, None, None], hi(), short()))
    which = jnp.where((long | ~active).all(), 1, jnp.where((long & active).any(), 2, 0))
    return jax.lax.switch(which, branches)


def _short_select(q, keys: IndexPages, w, q_positions, new_lens, cfg: Config):
    """The flat rule (`paged_cache.select` without HI) over the first max(hi_min_len, index_topk) rows of
    each sequence, gathered with the new key in place: all a short row has. [B, 1, K]."""
    B, W = keys.table.shape
    page, J = keys.pages.shape[1:]
    W = min(W, -(-max(cfg.hi_min_len, cfg.index_topk) // page))
    rows = keys.pages[keys.table[:, :W]].reshape(B, W * page, J)
    rows = paged_cache.overlay_rows(rows, keys.new[:, None], q_positions[:, None], new_lens)
    k_pos = jnp.broadcast_to(jnp.arange(W * page, dtype=jnp.int32), (B, W * page))
    seq_lens = q_positions + new_lens
    flat = dataclasses.replace(cfg, hi_enabled=False)
    return paged_cache.select(q, rows, w, q_positions[:, None], k_pos, flat, k_pos < seq_lens[:, None],
                              seq_lens)


def _hi_select(q, keys: IndexPages, w, q_positions, cfg: Config):
    """HI's choice (`indexer.select_topk_hierarchical`, then the SI rule) for rows of more than
    max(hi_min_len, index_topk) keys, from the block sums and the keys it can pick. [B, 1, K]."""
    blocks = _top_blocks(q, w, _block_means(keys, q_positions, cfg.hi_block_size), q_positions, cfg)
    pos = _candidate_positions(blocks, q_positions, cfg)
    scores = weighted_relu_scores(q, _keys_at(keys, pos, q_positions), w)  # [B, 1, C]
    if cfg.si_enabled:
        scores = jnp.where(forced_keys(q_positions[:, None], pos, cfg), jnp.inf, scores)
    scores = jnp.where((pos >= 0)[:, None], scores, -jnp.inf)
    return top_k_indices(scores, cfg.index_topk, idx=pos[:, None])


def _block_means(keys: IndexPages, q_positions, block_size: int):
    """k_bar [B, NB, J], NB = ceil(S / block_size): the mean key of every block that has ended by the query
    (the block sums of the pages over block_size) and of the query's own block (its rows up to the query).
    Later blocks get meaningless values; HI never chooses them."""
    B, W = keys.table.shape
    page, J = keys.pages.shape[1:]
    runs = keys.sums.shape[0] // keys.pages.shape[0]
    per_block = block_size // (page // runs)
    nb = -(-W * page // block_size)
    sums = keys.sums[(keys.table[..., None] * runs + jnp.arange(runs)).reshape(B, W * runs)]
    sums = jnp.pad(sums, ((0, 0), (0, nb * per_block - W * runs), (0, 0)))
    k_bar = sums.reshape(B, nb, per_block, J).sum(2) / block_size
    # The own block's page rows past the query are unwritten (or stale) and the new key is not in them yet
    own = q_positions // block_size
    own_pos = own[:, None] * block_size + jnp.arange(block_size)
    inside = own_pos <= q_positions[:, None]
    own_sum = jnp.where(inside[..., None], _keys_at(keys, own_pos, q_positions), 0.0).sum(1)
    return k_bar.at[jnp.arange(B), own].set(own_sum / inside.sum(1, keepdims=True))


def _top_blocks(q, w, k_bar, q_positions, cfg: Config):
    """int32 [B, M] the top M = min(hi_top_blocks, NB) candidate blocks, -1 where top-k picked a
    non-candidate. A candidate holds a non-streaming key and has ended by the query (docs/architecture.md#hi);
    such a block holds no unwritten row, which is why the page sums give its mean."""
    init, local = (cfg.index_init_tokens, cfg.index_local_tokens) if cfg.si_enabled else (0, 0)
    nb = k_bar.shape[1]
    start = jnp.arange(nb, dtype=jnp.int32) * cfg.hi_block_size
    end = start + cfg.hi_block_size - 1
    qp = q_positions[:, None]
    candidate = (start <= qp - local) & (end >= init) & (end <= qp)  # [B, NB]
    scores = jnp.where(candidate, weighted_relu_scores(q, k_bar, w)[:, 0], -jnp.inf)
    vals, ids = jax.lax.top_k(scores, min(cfg.hi_top_blocks, nb))
    return jnp.where(vals > -jnp.inf, ids, -1)


def _candidate_positions(blocks, q_positions, cfg: Config):
    """int32 [B, C]: the positions HI may pick for the query (the chosen blocks' rows, the query's own block
    up to the query and, under SI, the sinks and the local window), each once, in ascending order among the
    entries >= 0; -1 fills the rest."""
    B, Bh = blocks.shape[0], cfg.hi_block_size
    offsets = jnp.arange(Bh, dtype=jnp.int32)
    qp = q_positions[:, None]
    parts = [jnp.where(blocks[..., None] >= 0, blocks[..., None] * Bh + offsets, -1).reshape(B, -1),
             (qp // Bh) * Bh + offsets]
    if cfg.si_enabled:
        init, local = cfg.index_init_tokens, cfg.index_local_tokens
        parts += [jnp.broadcast_to(jnp.arange(init, dtype=jnp.int32), (B, init)),
                  qp - local + 1 + jnp.arange(local, dtype=jnp.int32)]
    pos = jnp.sort(jnp.concatenate(parts, axis=1), axis=1)
    repeat = jnp.pad(pos[:, 1:] == pos[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(repeat | (pos > qp), -1, pos)


def _keys_at(keys: IndexPages, pos, q_positions):
    """Each sequence's keys [B, C, J] at positions pos [B, C] through its page table (a negative or
    out-of-table position reads some row; callers mask it), the new key at the query's position."""
    page = keys.pages.shape[1]
    p = jnp.maximum(pos, 0)
    page_ids = jnp.take_along_axis(keys.table, jnp.minimum(p // page, keys.table.shape[1] - 1), axis=1)
    rows = keys.pages[page_ids, p % page]
    return jnp.where((pos == q_positions[:, None])[..., None], keys.new[:, None], rows)
