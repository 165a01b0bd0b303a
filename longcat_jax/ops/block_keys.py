"""Block means of the indexer keys: hierarchical indexing (HI) scores a query against one mean key per block
of `block_size` consecutive positions before it scores tokens, and only inside the best blocks."""

from __future__ import annotations

import jax.numpy as jnp


def block_keys(k, k_positions, block_size: int, k_valid=None):
    """Mean indexer key per block of positions, by a scatter-add: O(S * J) memory, no [S, NB] one-hot.

    k [B,S,J] (post-norm, post-RoPE), k_positions int [B,S], k_valid bool [B,S] or None. Returns
    (k_bar [B,NB,J] float32, count int32 [B,NB]) with NB = ceil(S / block_size); an empty block has a zero
    mean and count 0. Invalid keys and positions outside [0, NB * block_size) count in no block.
    """
    B, S, J = k.shape
    nb = -(-S // block_size)
    block = k_positions // block_size
    member = (block >= 0) & (block < nb)
    if k_valid is not None:
        member = member & k_valid
    block = jnp.where(member, block, nb)  # bucket nb collects the non-members and is dropped
    rows = jnp.arange(B)[:, None]
    k_sum = jnp.zeros((B, nb + 1, J), jnp.float32).at[rows, block].add(k.astype(jnp.float32))[:, :nb]
    count = jnp.zeros((B, nb + 1), jnp.float32).at[rows, block].add(1.0)[:, :nb]
    return k_sum / jnp.maximum(count, 1.0)[..., None], count.astype(jnp.int32)
