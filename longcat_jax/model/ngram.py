"""Hashed N-gram embedding ("over-embedding", OE) of LongCat-Flash-Lite / LongCat-2.0
(docs/architecture.md#ngram).

For branch i = (n - 2) * K + j (order n in 2..N, split j in 0..K-1) with modulus R_i = M + 2i + 1:

    id_i(t) = ( sum_{d=0}^{n-1} tok'(t - d) * (V^d mod R_i) ) mod R_i

where tok'(t - d) is the token d steps back inside the current EOS-delimited segment, else 0 (an EOS belongs
to the segment it ends; the token after it starts with all-zero history). The embedding is
sum_i P_i T_i[id_i(t)]; the caller adds the token embedding and divides by 1 + G.

The hash arithmetic (exact uint32 mulmod without x64), the EOS-segmented windows and the concatenated
table's layout live in `longcat_jax.ops.ngram_hash`, shared with the fused kernel.

History: decode and chunked prefill carry the previous N - 1 tokens. Zeros stand for "nothing before": a
zero contributes 0 to every sum, exactly like a position before the sequence start, so `history=None`,
an all-zero history and an all-EOS history give identical ids (HF `NgramCache` also starts from zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.layers import param
from longcat_jax.ops.ngram_hash import TABLE_AXES, hash_plan, require_ngram, segment_windows, table_offsets
from sharding.constrain import constrain


def hash_ids(tokens: jax.Array, config: Config, history: jax.Array | None = None) -> jax.Array:
    """Per-branch table rows of every position.

    Args:
      tokens: int [B, T], token ids in [0, V).
      config: static Config (hashable; pass with static_argnums under jit).
      history: optional int [B, N-1], the previous N-1 tokens of the same sequences, oldest first
        (see `next_history`); None = the sequences start here.
    Returns:
      int32 [B, T, G], id_i in [0, R_i); add `table_offsets(config)` for rows of the concatenated table.
    """
    coef, moduli, w, chunks, reduce_tokens = hash_plan(config)
    win = segment_windows(tokens, history, config)[:, :, :, None]  # [B, T, N, 1]
    moduli = jnp.asarray(moduli)  # [G]
    if reduce_tokens:
        win = win % moduli  # [B, T, N, G]
    mask = jnp.uint32((1 << w) - 1)
    acc = jnp.zeros(tokens.shape + (config.ngram_branches,), jnp.uint32)
    for d in range(config.ngram_n):
        for k in range(chunks):
            part = (win[:, :, d] >> jnp.uint32(w * k)) & mask  # [B, T, 1 or G], < 2^w
            # part * coef < 2^w * R <= 2^32 (choice of w); acc + term < 2 R < 2^31.
            term = (part * jnp.asarray(coef[d, k])) % moduli
            acc = (acc + term) % moduli
    return acc.astype(jnp.int32)


def next_history(history: jax.Array | None, tokens: jax.Array, config: Config) -> jax.Array:
    """The last N-1 tokens of [history; tokens]: int32 [B, N-1], to carry into the next decode/prefill chunk.

    history None means the sequence started with `tokens`; the missing slots are filled with 0, which
    hashes exactly like "before the sequence start" (a zero contributes nothing, see module docstring).
    """
    require_ngram(config)
    B = tokens.shape[0]
    H = config.ngram_n - 1
    if history is None:
        history = jnp.zeros((B, H), jnp.int32)
    ctx = jnp.concatenate([history.astype(jnp.int32), tokens.astype(jnp.int32)], axis=1)
    return ctx[:, ctx.shape[1] - H :]


def ngram_embed(tables: jax.Array, proj: jax.Array, ids: jax.Array, config: Config) -> jax.Array:
    """sum_i P_i T_i[id_i]: the N-gram part of the input embedding (before adding E[tok] and dividing by 1+G).

    Args:
      tables: [sum R_i, ngram_dim], all branch tables stacked by rows in branch order
        ("ngram_rows", "ngram_dim").
      proj: [G, ngram_dim, D] per-branch projections ("ngram_branch", "ngram_dim", "embed").
      ids: int32 [B, T, G] from `hash_ids`.
    Returns:
      [B, T, D] in config.jnp_dtype.
    """
    offsets = table_offsets(config)
    if offsets[-1] + config.ngram_table_rows[-1] >= 2**31:
        raise ValueError("concatenated N-gram table has >= 2**31 rows; int32 row ids would overflow")
    rows = ids.astype(jnp.int32) + jnp.asarray(offsets, jnp.int32)  # [B, T, G]
    dt = config.jnp_dtype
    # Embedding parallelism (EMBP) without a kernel: on a mesh whose rows axis (vp) shards the table, XLA
    # partitions this gather as a masked lookup of each device's own rows and one all-reduce of the [B, T, G,
    # dim] result, never gathering the table. The constraint's transpose keeps the table's gradient (a
    # scatter-add) row-sharded too, instead of one full-size gradient per device.
    tables = constrain(tables, TABLE_AXES)
    emb = tables.at[rows].get(mode="promise_in_bounds").astype(dt)  # [B, T, G, ngram_dim]
    # One contraction over (branch, dim) with f32 accumulation. HF sums the G projections sequentially in
    # bf16 after the token embedding; this is the more accurate order (differences are bf16 rounding only).
    out = jnp.einsum("btgk,gkd->btd", emb, proj.astype(dt), preferred_element_type=jnp.float32)
    return out.astype(dt)


class NgramEmbedding(nnx.Module):
    """The G hashed tables (one flat row-sharded table) and their projections back to the model width."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        require_ngram(cfg)
        pd = cfg.jnp_param_dtype
        rows = sum(cfg.ngram_table_rows)
        self.tables = param(rngs, (rows, cfg.ngram_dim), TABLE_AXES, pd)
        proj_shape = (cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size)
        self.proj = param(rngs, proj_shape, ("ngram_branch", "ngram_dim", "embed"), pd)
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, history: jax.Array | None = None) -> jax.Array:
        """tokens int [B, T], history int [B, N-1] or None -> [B, T, D]."""
        ids = hash_ids(tokens, self.cfg, history)
        return ngram_embed(self.tables[...], self.proj[...], ids, self.cfg)
