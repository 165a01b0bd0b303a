"""The N-gram embedding's hash arithmetic and table layout, shared by `longcat_jax.model.ngram` (the
reference `hash_ids` / `ngram_embed`) and the fused kernel `pallas_kernels.ngram_lookup`.

For branch i = (n - 2) * K + j (order n in 2..N, split j in 0..K-1) with modulus R_i = M + 2i + 1:

    id_i(t) = ( sum_{d=0}^{n-1} tok'(t - d) * (V^d mod R_i) ) mod R_i

where tok'(t - d) is the token d steps back inside the current EOS-delimited segment, else 0
(`segment_windows`). All G branch tables live in one table [sum R_i, ngram_dim], branch after branch
(`table_offsets`), whose logical axes are `TABLE_AXES`.

Exact integers without x64: the un-reduced sum reaches ~1e13, so instead of int64 every product is reduced
modulo R_i with uint32 arithmetic. The (static) coefficient c = V^d mod R_i is folded with each w-bit chunk
position of the token, c_k = c * 2^(w k) mod R_i, in Python ints; then tok * c = sum_k chunk_k(tok) * c_k
(mod R_i) and every product chunk_k * c_k < 2^w * R_i fits in 32 bits. w is chosen from the largest modulus
(`hash_plan`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import Config

# Logical axis names of the concatenated table: the model declares its parameter with them and the kernel
# resolves its row-sharding mesh axis from them, so both follow the same rules table.
TABLE_AXES = ("ngram_rows", "ngram_dim")

_U32_MAX = 2**32 - 1


def require_ngram(cfg: Config):
    """Raise unless the N-gram embedding is on."""
    if not cfg.ngram_n:
        raise ValueError("N-gram embedding is off (ngram_n = 0)")


def table_offsets(cfg: Config) -> tuple[int, ...]:
    """Start row of each branch table inside the one concatenated table [sum R_i, ngram_dim], branch order."""
    require_ngram(cfg)
    rows = cfg.ngram_table_rows
    return tuple(int(x) for x in np.cumsum((0,) + rows[:-1]))


@functools.cache
def hash_plan(cfg: Config):
    """Static constants of the uint32 mulmod, all from Python ints.

    Returns (coef [N, C, G] uint32, moduli [G] uint32, width w, chunks C, reduce_tokens). coef[d, k, i] is
    (V^d mod R_i) * 2^(w k) mod R_i for d < n_i and 0 for orders that do not reach d steps back.
    """
    require_ngram(cfg)
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


def segment_windows(tokens: jax.Array, history: jax.Array | None, cfg: Config) -> jax.Array:
    """tok'(t - d) for d = 0..N-1: [B, T, N] uint32, zero outside the current EOS segment.

    tokens int [B, T]; history int [B, N-1] (the previous N-1 tokens, oldest first) or None = the sequences
    start here. An EOS belongs to the segment it ends; the token after it starts with all-zero history.
    """
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
