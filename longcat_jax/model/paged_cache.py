"""The paged decode cache of the serving engine (docs/architecture.md#paged-cache).

One pool of pages per layer and sublayer holds the latent rows c_kv | k_rope (R + Hr values per token, the
layout `pallas_kernels.sparse_mla_decode` reads); each indexer owner has a pool of the same pages for its
keys [J]. Logical position p of a sequence lives in page page_table[p // page_size], row p % page_size, so
sequences of any length share the pool, and a page of a common prompt prefix can serve several sequences at
once. The host (`longcat_jax.serving.pages`) decides which page holds what; these functions only read and
write rows.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from longcat_jax.config import Config
from longcat_jax.model.indexer import select as reference_select
from longcat_jax.ops.lsa_rules import use_hierarchical
from pallas_kernels import indexer_topk


@flax.struct.dataclass
class PagedCache:
    kv: jax.Array  # [L, 2, P, page, R + Hr] in the compute dtype: c_kv | k_rope rows
    index_k: jax.Array | None  # [L, indexers per layer, P, page, J] f32; None without an indexer

    @property
    def num_pages(self) -> int:
        return self.kv.shape[2]

    @property
    def page_size(self) -> int:
        return self.kv.shape[3]


def init_paged_cache(cfg: Config, num_pages: int, page_size: int) -> PagedCache:
    L = cfg.num_layers
    index_k = None
    if cfg.use_indexer:
        index_k = jnp.zeros((L, cfg.indexer_sublayers, num_pages, page_size, cfg.index_head_dim), jnp.float32)
    kv = jnp.zeros((L, 2, num_pages, page_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim), cfg.jnp_dtype)
    return PagedCache(kv=kv, index_k=index_k)


def row_slots(page_table, positions, new_lens, num_pages: int, page_size: int):
    """Flat row [B, T] of each new token in a pool of num_pages pages; padding tokens (t >= new_lens) get the
    out-of-range row num_pages * page_size, which a `mode="drop"` scatter ignores."""
    T = positions.shape[1]
    page = jnp.take_along_axis(page_table, jnp.clip(positions // page_size, 0, page_table.shape[1] - 1), 1)
    real = jnp.arange(T)[None, :] < new_lens[:, None]
    return jnp.where(real, page * page_size + positions % page_size, num_pages * page_size)


def scatter_rows(pages, rows, slots):
    """pages [P, page, X] with rows [B, T, X] written at flat slots [B, T] (out-of-range slots dropped)."""
    P, page, X = pages.shape
    flat = pages.reshape(P * page, X).at[slots.reshape(-1)].set(
        rows.reshape(-1, X).astype(pages.dtype), mode="drop")
    return flat.reshape(P, page, X)


def gather_rows(pages, page_table):
    """Each sequence's rows in logical order: [B, W * page, X] from pages [P, page, X], page_table [B, W]."""
    B, W = page_table.shape
    return pages[page_table].reshape(B, W * pages.shape[1], pages.shape[2])


def select(q, k, w, q_positions, k_positions, cfg: Config, k_valid, seq_lens):
    """LSA indices [B, T, K] over a sequence's gathered cache rows, as `indexer.select` would choose them for
    that sequence alone.

    HI switches on by each sequence's own length (seq_lens [B] > cfg.hi_min_len) rather than by the key axis,
    which here is the page-table width the batch was compiled for: a sequence's selection must not depend on
    what else is batched with it. cfg.kernel_impl "reference" uses the [T, S] reference, else the fused
    `pallas_kernels.indexer_topk` selection.
    """
    if cfg.kernel_impl == "reference":
        def rule(c):
            return reference_select(q, k, w, q_positions, k_positions, c, k_valid)
    else:
        def rule(c):
            return indexer_topk.select(q, k, w, q_positions, k_positions, c, k_valid=k_valid,
                                       impl=c.kernel_impl)
    if not use_hierarchical(cfg, k.shape[1]):
        return rule(cfg)
    flat = rule(dataclasses.replace(cfg, hi_enabled=False))
    return jnp.where((seq_lens > cfg.hi_min_len)[:, None, None], rule(cfg), flat)
