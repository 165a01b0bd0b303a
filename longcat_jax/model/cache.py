"""The decode cache: latent KV rows, indexer keys and N-gram history, passed in and returned
(docs/architecture.md#cache).

Per token and MLA sublayer the cache holds the scaled c_kv [R] and the rotated k_rope [Hr] (576 values at full
size); each indexer owner adds its keys [J]. Arrays are stacked over the decoder layers so the layer scan can
slice them.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from longcat_jax.config import Config
from longcat_jax.model.ngram import next_history


@flax.struct.dataclass
class Cache:
    c_kv: jax.Array  # [L, 2, B, S, R]
    k_rope: jax.Array  # [L, 2, B, S, Hr]
    index_k: jax.Array | None  # [L, indexers per layer, B, S, J], f32; None without an indexer
    ngram_history: jax.Array | None  # [B, N-1] last tokens; None without the N-gram embedding
    length: jax.Array  # int32 scalar: rows already written

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[3]


@dataclasses.dataclass(frozen=True)
class Keys:
    """The keys one sublayer attends over, after its cache (if any) took the new rows."""

    c_kv: jax.Array  # [B,S,R] in the compute dtype
    k_rope: jax.Array  # [B,S,Hr]
    positions: jax.Array  # [B,S]
    valid: jax.Array | None  # [B,S] rows of the cache filled so far; None without a cache
    q_offset: int | jax.Array  # the new tokens' first row (0 without a cache)
    # The paged cache: every pool's latent rows [pools * P, page, R + Hr] as they were before the step, the
    # sequences' page tables [B, W] into them, and the first new token's row [B, R + Hr] (not in the pages)
    pages: jax.Array | None = None
    page_table: jax.Array | None = None
    new_rows: jax.Array | None = None


def init_cache(cfg: Config, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    L, dt = cfg.num_layers, cfg.jnp_dtype
    index_k = None
    if cfg.use_indexer:
        index_k = jnp.zeros((L, cfg.indexer_sublayers, batch, max_len, cfg.index_head_dim), jnp.float32)
    history = None
    if cfg.ngram_n:
        history = next_history(None, jnp.zeros((batch, 0), jnp.int32), cfg)
    return Cache(
        c_kv=jnp.zeros((L, 2, batch, max_len, cfg.kv_lora_rank), dt),
        k_rope=jnp.zeros((L, 2, batch, max_len, cfg.qk_rope_head_dim), dt),
        index_k=index_k,
        ngram_history=history,
        length=jnp.zeros((), jnp.int32),
    )
