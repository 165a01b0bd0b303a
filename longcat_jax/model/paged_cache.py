"""The paged decode cache of the serving engine (docs/architecture.md#paged-cache).

One pool of pages per layer and sublayer holds the latent rows c_kv | k_rope (R + Hr values per token, the
layout `pallas_kernels.sparse_mla_decode` reads); each indexer owner has a pool of the same pages for its
keys [J]. Logical position p of a sequence lives in page page_table[p // page_size], row p % page_size, so
sequences of any length share the pool, and a page of a common prompt prefix can serve several sequences at
once. With HI the cache also keeps the sum of every run of `sum_span` rows of the indexer keys, from which a
decode step's selection takes its block means without reading the keys (`paged_select`). The host
(`longcat_jax.serving.pages`) decides which page holds what; these functions only read and write rows.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from longcat_jax.config import Config
from longcat_jax.model.indexer import select as reference_select
from longcat_jax.ops.lsa_rules import use_hierarchical
from pallas_kernels import indexer_topk
from pallas_kernels.impl import resolve


@flax.struct.dataclass
class PagedCache:
    kv: jax.Array  # [L, 2, P, page, R + Hr] in the compute dtype: c_kv | k_rope rows
    index_k: jax.Array | None  # [L, indexers per layer, P, page, J] f32; None without an indexer
    # [L, indexers per layer, P, page / sum_span, J] f32: the sum of each run of sum_span rows of index_k,
    # kept equal to them by `write_index_sums`; None without HI
    index_sum: jax.Array | None = None

    @property
    def num_pages(self) -> int:
        return self.kv.shape[2]

    @property
    def page_size(self) -> int:
        return self.kv.shape[3]


def init_paged_cache(cfg: Config, num_pages: int, page_size: int) -> PagedCache:
    L = cfg.num_layers
    index_k = index_sum = None
    if cfg.use_indexer:
        index_k = jnp.zeros((L, cfg.indexer_sublayers, num_pages, page_size, cfg.index_head_dim), jnp.float32)
    if has_index_sums(cfg):
        runs = page_size // sum_span(cfg, page_size)
        index_sum = jnp.zeros((L, cfg.indexer_sublayers, num_pages, runs, cfg.index_head_dim), jnp.float32)
    kv = jnp.zeros((L, 2, num_pages, page_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim), cfg.jnp_dtype)
    return PagedCache(kv=kv, index_k=index_k, index_sum=index_sum)


def page_bytes(cfg: Config, page_size: int) -> int:
    """Bytes one page of `page_size` rows takes in every layer's pools (`init_paged_cache`): a memory budget
    for the cache divided by this is the pool size."""
    kv = 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(cfg.jnp_dtype).itemsize
    index = cfg.indexer_sublayers * cfg.index_head_dim * 4 if cfg.use_indexer else 0
    sums = 0
    if has_index_sums(cfg):
        sums = page_size // sum_span(cfg, page_size) * cfg.indexer_sublayers * cfg.index_head_dim * 4
    return cfg.num_layers * (page_size * (kv + index) + sums)


def has_index_sums(cfg: Config) -> bool:
    """Whether the cache keeps `PagedCache.index_sum`: HI's block means are what it is for."""
    return cfg.use_indexer and cfg.hi_enabled


def sum_span(cfg: Config, page_size: int) -> int:
    """Rows per entry of `PagedCache.index_sum`: gcd(page_size, hi_block_size), so that a run never crosses a
    page or an HI block, and a block is a whole number of runs whichever of the two sizes is larger."""
    return math.gcd(page_size, cfg.hi_block_size)


def index_sums(index_k, span: int):
    """[..., P, page, J] keys -> [..., P, page / span, J] f32 sums of each run of `span` rows."""
    *lead, page, J = index_k.shape
    return index_k.astype(jnp.float32).reshape(*lead, page // span, span, J).sum(-2)


def written_pages(slots, positions, page_size: int, num_pages: int):
    """Pages [B, n] that received a row in a step, each once per sequence, num_pages where none: the pages of
    slots [B, T] (`row_slots`; positions [B, T] are consecutive in each row). Entry 0 is the page of the row's
    first token, entry j > 0 the page of its j-th token that starts a page."""
    T = slots.shape[1]
    n = (T + page_size - 2) // page_size + 1  # most pages T consecutive rows can touch
    first = jnp.arange(n) * page_size - positions[:, :1] % page_size  # [B, n]; entry 0 is <= 0
    rows = jnp.take_along_axis(slots, jnp.clip(first, 0, T - 1), 1)
    return jnp.where(first < T, rows // page_size, num_pages)  # padding slots are out of range: num_pages


def write_index_sums(index_sum, index_k, pages):
    """index_sum [L, n, P, page / span, J] with the sums of `pages` [B, m] (num_pages = none, dropped)
    recomputed from index_k [L, n, P, page, J] after the step's rows were written: a page's sum is rebuilt
    from its rows, never incremented, so rewriting a row (a recomputed request, a reused page) cannot count it
    twice."""
    P, page = index_k.shape[2:4]
    pages = pages.reshape(-1)
    rows = index_k[:, :, jnp.clip(pages, 0, P - 1)]  # [L, n, B * m, page, J]
    span = page // index_sum.shape[3]
    return index_sum.at[:, :, pages].set(index_sums(rows, span), mode="drop")


def row_slots(page_table, positions, new_lens, num_pages: int, page_size: int):
    """Row [B, T] of each new token within a pool of num_pages pages; padding tokens (t >= new_lens) get the
    out-of-range row num_pages * page_size."""
    T = positions.shape[1]
    page = jnp.take_along_axis(page_table, jnp.clip(positions // page_size, 0, page_table.shape[1] - 1), 1)
    real = jnp.arange(T)[None, :] < new_lens[:, None]
    return jnp.where(real, page * page_size + positions % page_size, num_pages * page_size)


def write_rows(pages, rows, slots):
    """pages [L, n, P, page, X] (n pools per layer) with each pool's new rows [L, n, B, T, X] written at slots
    [B, T] (from `row_slots`; out-of-range slots are dropped). One scatter after the layers have run: while
    they run the pages are only read, so XLA updates the donated cache in place instead of copying it."""
    L, n, P, page, X = pages.shape
    pool = jnp.arange(L * n).reshape(L, n, 1, 1)
    at = jnp.where(slots < P * page, pool * (P * page) + slots, L * n * P * page)  # [L, n, B, T]
    flat = pages.reshape(-1, X).at[at.reshape(-1)].set(rows.reshape(-1, X).astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


def overlay_rows(rows, new, positions, new_lens):
    """rows [B, S, X] gathered from the pages with the step's new rows [B, T, X] put at their positions."""
    B, S, _ = rows.shape
    at = jnp.where(jnp.arange(new.shape[1])[None, :] < new_lens[:, None], positions, S)
    return rows.at[jnp.arange(B)[:, None], at].set(new.astype(rows.dtype), mode="drop")


def pool_pages(pages, page_table, pool):
    """(every pool's pages as one [pools * P, page, X] array, page_table [B, W] pointing into pool `pool`)."""
    P, page, X = pages.shape[-3:]
    return pages.reshape(-1, page, X), page_table + pool * P


def gather_rows(pages, page_table, pool):
    """Each sequence's rows of pool `pool` in logical order: [B, W * page, X]."""
    all_pages, table = pool_pages(pages, page_table, pool)
    B, W = table.shape
    return all_pages[table].reshape(B, W * all_pages.shape[1], all_pages.shape[2])


def select(q, k, w, q_positions, k_positions, cfg: Config, k_valid, seq_lens):
    """LSA indices [B, T, K] over a sequence's gathered cache rows, as `indexer.select` would choose them for
    that sequence alone.

    HI switches on by each sequence's own length (seq_lens [B] > cfg.hi_min_len) rather than by the key axis,
    which here is the page-table width the batch was compiled for: a sequence's selection must not depend on
    what else is batched with it. cfg.kernel_impl "reference" uses the [T, S] reference, else the fused
    `pallas_kernels.indexer_topk` selection, except where that would be its XLA form and each row has one
    query (a decode step): [1, S] scores are small, and XLA:CPU ranks them faster materialised (53 vs 93 ms
    per token of the small preset at 32K keys, bench/serve.py's LSA part). Both choose the same keys.
    """
    if cfg.kernel_impl == "reference" or (q.shape[1] == 1 and resolve(cfg.kernel_impl) == "xla"):
        def rule(c):
            return reference_select(q, k, w, q_positions, k_positions, c, k_valid)
    else:
        def rule(c):
            return indexer_topk.select(q, k, w, q_positions, k_positions, c, k_valid=k_valid,
                                       impl=c.kernel_impl)
    if not use_hierarchical(cfg, k.shape[1]):
        return rule(cfg)
    long = seq_lens > cfg.hi_min_len
    flat_cfg = dataclasses.replace(cfg, hi_enabled=False)
    # Only a batch that mixes short and long sequences pays for both selections
    branches = (lambda: rule(flat_cfg), lambda: rule(cfg),
                lambda: jnp.where(long[:, None, None], rule(cfg), rule(flat_cfg)))
    which = jnp.where(long.all(), 1, jnp.where(long.any(), 2, 0))
    return jax.lax.switch(which, branches)
