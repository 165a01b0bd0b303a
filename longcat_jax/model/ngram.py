"""Hashed N-gram embedding ("over-embedding", OE) of LongCat-Flash-Lite / LongCat-2.0 (SPEC.md 3.7, 4.2, 4.5).

For branch i = (n - 2) * K + j (order n in 2..N, split j in 0..K-1) with modulus R_i = M + 2i + 1:

    id_i(t) = ( sum_{d=0}^{n-1} tok'(t - d) * (V^d mod R_i) ) mod R_i

where tok'(t - d) is the token d steps back inside the current EOS-delimited segment, else 0 (an EOS belongs
to the segment it ends; the token after it starts with all-zero history). The embedding is
sum_i P_i T_i[id_i(t)]; the caller adds the token embedding and divides by 1 + G.

Exact integers without x64: the un-reduced sum reaches ~1e13, so instead of int64 we reduce every product
modulo R_i with uint32 arithmetic. The (static) coefficient c = V^d mod R_i is folded with each w-bit chunk
position of the token, c_k = c * 2^(w k) mod R_i, in Python ints; then tok * c = sum_k chunk_k(tok) * c_k
(mod R_i) and every product chunk_k * c_k < 2^w * R_i fits in 32 bits. w is chosen from the largest modulus.

History: decode and chunked prefill carry the previous N - 1 tokens. Zeros stand for "nothing before": a
zero contributes 0 to every sum, exactly like a position before the sequence start, so `history=None`,
an all-zero history and an all-EOS history give identical ids (HF `NgramCache` also starts from zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.layers import param

_U32_MAX = 2**32 - 1


def _need_ngram(cfg: Config):
    if not cfg.ngram_n:
        raise ValueError("N-gram embedding is off (ngram_n = 0)")


def table_offsets(cfg: Config) -> tuple[int, ...]:
    """Start row of each branch table inside the one concatenated table [sum R_i, ngram_dim], branch order."""
    _need_ngram(cfg)
    rows = cfg.ngram_table_rows
    return tuple(int(x) for x in np.cumsum((0,) + rows[:-1]))


@functools.cache
def _hash_plan(cfg: Config):
    """Static constants of the uint32 mulmod, all from Python ints.

    Returns (coef [N, C, G] uint32, moduli [G] uint32, width w, chunks C, reduce_tokens). coef[d, k, i] is
    (V^d mod R_i) * 2^(w k) mod R_i for d < n_i and 0 for orders that do not reach d steps back.
    """
    _need_ngram(cfg)
    N, K, V = cfg.ngram_n, cfg.ngram_splits, cfg.vocab_size
    rows = cfg.ngram_table_rows
    r_max = max(rows)
    # Largest w with (R - 1) * (2^w - 1) <= 2^32 - 1: a chunk times a reduced coefficient never overflows.
    w = 1
    while (r_max - 1) * (2 ** (w + 1) - 1) <= _U32_MAX and w < 32:
        w += 1
    # Tokens are < V; when some R_i < V they are reduced mod R_i first, so operands are < min(V, R_max).
    reduce_tokens = V > min(rows)
    a_bits = max(1, (min(V, r_max) - 1).bit_length())
    w = min(w, a_bits)
    chunks = -(-a_bits // w)
    coef = np.zeros((N, chunks, len(rows)), np.uint32)
    for i, r in enumerate(rows):
        n = i // K + 2
        for d in range(n):
            c = pow(V, d, r)
            for k in range(chunks):
                coef[d, k, i] = (c << (w * k)) % r
    return coef, np.asarray(rows, np.uint32), w, chunks, reduce_tokens


def _segment_windows(tokens: jax.Array, history: jax.Array | None, cfg: Config) -> jax.Array:
    """tok'(t - d) for d = 0..N-1: [B, T, N] uint32, zero outside the current EOS segment."""
    B, T = tokens.shape
    H = cfg.ngram_n - 1
    tokens = tokens.astype(jnp.int32)
    if history is None:
        history = jnp.zeros((B, H), jnp.int32)
    if history.shape != (B, H):
        raise ValueError(f"history must be [B, N-1] = {(B, H)}, got {history.shape}")
    ctx = jnp.concatenate([history.astype(jnp.int32), tokens], axis=1)  # [B, H + T]
    L = H + T
    pos = jnp.arange(L, dtype=jnp.int32)
    eos_at = jnp.where(ctx == cfg.eos_token_id, pos, -1)
    last_eos = jax.lax.cummax(eos_at, axis=1)  # last EOS at q <= t
    # The last EOS strictly before t: an EOS at t itself belongs to t's segment.
    prev_eos = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), last_eos[:, :-1]], axis=1)[:, H:]  # [B, T]
    out_pos = pos[H:]
    cols = []
    for d in range(cfg.ngram_n):
        src = ctx[:, H - d : L - d]  # token at t - d (history positions included)
        cols.append(jnp.where(out_pos - d > prev_eos, src, 0))
    return jnp.stack(cols, axis=-1).astype(jnp.uint32)


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
    coef, moduli, w, chunks, reduce_tokens = _hash_plan(config)
    win = _segment_windows(tokens, history, config)[:, :, :, None]  # [B, T, N, 1]
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
    _need_ngram(config)
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
    emb = tables.at[rows].get(mode="promise_in_bounds").astype(dt)  # [B, T, G, ngram_dim]
    # One contraction over (branch, dim) with f32 accumulation. HF sums the G projections sequentially in
    # bf16 after the token embedding; this is the more accurate order (differences are bf16 rounding only).
    out = jnp.einsum("btgk,gkd->btd", emb, proj.astype(dt), preferred_element_type=jnp.float32)
    return out.astype(dt)


class NgramEmbedding(nnx.Module):
    """The G hashed tables (one flat row-sharded table) and their projections back to the model width."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        _need_ngram(cfg)
        pd = cfg.jnp_param_dtype
        rows = sum(cfg.ngram_table_rows)
        self.tables = param(rngs, (rows, cfg.ngram_dim), ("ngram_rows", "ngram_dim"), pd)
        proj_shape = (cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size)
        self.proj = param(rngs, proj_shape, ("ngram_branch", "ngram_dim", "embed"), pd)
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, history: jax.Array | None = None) -> jax.Array:
        """tokens int [B, T], history int [B, N-1] or None -> [B, T, D]."""
        ids = hash_ids(tokens, self.cfg, history)
        return ngram_embed(self.tables[...], self.proj[...], ids, self.cfg)
