"""Blocks of queries for `lax.map`: the linear-memory paths compute a [block_q, S] slice of a [T, S] quantity
at a time (indexer_loss.selection_recall, dense_warmup)."""

from __future__ import annotations

import jax.numpy as jnp


def split_queries(x, block_q: int, fill=0):
    """[B, T, ...] -> [n_blocks, B, block_q, ...] with block_q = min(block_q, T) and
    n_blocks = ceil(T / block_q); the last block is padded with `fill`."""
    B, T = x.shape[:2]
    block_q = min(block_q, T)
    pad = -T % block_q
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(B, (T + pad) // block_q, block_q, *x.shape[2:]), 1, 0)


def merge_queries(x, T: int):
    """The inverse of `split_queries`: [n_blocks, B, block_q, ...] -> [B, T, ...], padding dropped."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :T]
