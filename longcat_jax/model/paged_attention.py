"""Attention over the paged cache: the serving path of `block.attention_sublayer`
(docs/architecture.md#decode, docs/architecture.md#paged-cache).

`paged_keys` gathers each sequence's latent (and indexer) rows through its page table, with the step's new
rows put in place; `paged_attention` selects (`paged_cache.select`, or `paged_select.select` for a decode step
over HI's page sums) and attends: a decode token reads only its selected rows in place, a prefill chunk
attends in absorbed form with the selection as a mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from longcat_jax.model import paged_cache, paged_select
from longcat_jax.model.cache import Keys
from longcat_jax.model.mla import MLA, attend_paged_decode
from longcat_jax.ops.masks import attention_mask, indices_to_mask
from pallas_kernels.sparse_mla_decode import sparse_mla_decode_paged

if TYPE_CHECKING:  # block imports this module
    from longcat_jax.model.block import Context


def paged_keys(cache, c_kv, k_rope, index_qkw, ctx: Context, dtype):
    """`block._write_cache` for the paged cache, which the layers only read: the keys are each sequence's rows
    gathered from its pages in logical order with the new rows put in place, and the new rows are returned
    for `paged_cache.write_rows` to store after the last layer (XLA drops the gather where only the selected
    rows are read).

    `cache` holds the whole cache (`block._sublayer_cache`): kv [L, 2, P, page, R + Hr] and index_k
    [L, owners, P, page, J], with this sublayer's pool numbers, and with HI index_sum [L, owners, P,
    page / span, J].
    Returns (Keys, the owner's (q, k, w) with k over the gathered rows, this sublayer's new rows
    {"kv": [B, T, R + Hr], "index_k": [B, T, J] for an owner}). A decode step (one new token per row) with
    index_sum gathers no indexer keys: its k is a `paged_select.IndexPages`, the pages that
    `paged_select.select` reads in place."""
    new = {"kv": jnp.concatenate([c_kv, k_rope], axis=-1)}
    if index_qkw is not None:
        q_i, k_i, w_i = index_qkw
        new["index_k"] = k_i
        if ctx.positions.shape[1] == 1 and "index_sum" in cache:
            index_qkw = (q_i, paged_select.index_pages(cache["index_k"], cache["index_sum"], ctx.page_table,
                                                       cache["index_pool"], k_i[:, 0]), w_i)
        else:
            old = paged_cache.gather_rows(cache["index_k"], ctx.page_table, cache["index_pool"])
            index_qkw = (q_i, paged_cache.overlay_rows(old, k_i, ctx.positions, ctx.new_lens), w_i)
    old = paged_cache.gather_rows(cache["kv"], ctx.page_table, cache["kv_pool"])
    rows = paged_cache.overlay_rows(old, new["kv"], ctx.positions, ctx.new_lens).astype(dtype)
    B, S, R = rows.shape[0], rows.shape[1], c_kv.shape[-1]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    valid = k_pos < (ctx.cache_len + ctx.new_lens)[:, None]
    pages, table = paged_cache.pool_pages(cache["kv"], ctx.page_table, cache["kv_pool"])
    keys = Keys(rows[..., :R], rows[..., R:], k_pos, valid, ctx.cache_len, pages=pages, page_table=table,
                new_rows=new["kv"][:, 0])
    return keys, index_qkw, new


def paged_attention(attn: MLA, q_nope, q_rope, keys: Keys, index_qkw, indices, ctx: Context):
    """Attention over the paged cache (serving; no aux). The selection is `paged_cache.select` (HI by each
    sequence's own length), or for a decode step over HI's page sums the same keys by `paged_select.select`,
    which reads only the block sums and the keys HI may pick; one new token per sequence reads only its
    selected latent rows through the page table (`pallas_kernels.sparse_mla_decode`), or without an indexer
    all its rows (`mla.attend_paged_decode`); a prefill chunk attends in absorbed form with the selection as a
    mask, as the reference path does. Returns (out, indices or None, None)."""
    cfg = attn.cfg
    if index_qkw is not None and isinstance(index_qkw[1], paged_select.IndexPages):
        q_i, index_pages, w_i = index_qkw
        indices = paged_select.select(q_i, index_pages, w_i, ctx.cache_len, ctx.new_lens, cfg)
    elif index_qkw is not None:
        indices = paged_cache.select(*index_qkw, ctx.positions, keys.positions, cfg, keys.valid,
                                     ctx.cache_len + ctx.new_lens)
    if indices is not None and ctx.positions.shape[1] == 1:
        q_lat = attn.absorb_query(q_nope)
        impl = "xla" if cfg.kernel_impl == "reference" else cfg.kernel_impl
        o_lat = sparse_mla_decode_paged(q_lat[:, 0], q_rope[:, 0], keys.pages, keys.page_table, indices[:, 0],
                                        cfg.softmax_scale, new_rows=keys.new_rows, new_pos=ctx.cache_len,
                                        impl=impl)
        return attn.latent_output(o_lat[:, None]), indices, None
    if indices is None and ctx.positions.shape[1] == 1:  # dense decode: every cached row, read in place
        q_lat = attn.absorb_query(q_nope)
        o_lat = attend_paged_decode(q_lat[:, 0], q_rope[:, 0], keys.pages, keys.page_table, ctx.cache_len,
                                    keys.new_rows, cfg.softmax_scale)
        return attn.latent_output(o_lat[:, None].astype(q_nope.dtype)), None, None
    mask = attention_mask(ctx.positions, keys.positions, keys.valid)
    if indices is not None:
        mask = mask & indices_to_mask(indices, mask.shape[-1])
    out, _ = attn.attend(q_nope, q_rope, keys.c_kv, keys.k_rope, mask, absorbed=True)
    return out, indices, None
