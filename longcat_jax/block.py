"""The ScMoE decoder layer (SPEC 3.4) and the sparse-attention sublayer it is built from (SPEC 3.9).

    a = x + Attn0(RMS_in0(x))            # indexer owner
    u = RMS_post0(a);  m = MoE(u)        # shortcut MoE, added at the very end
    b = a + MLP0(u)
    c = b + Attn1(RMS_in1(b), idx)       # CLI: reuses the owner's indices
    y = c + MLP1(RMS_post1(c)) + m
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.indexer import Indexer, indices_to_mask, select
from longcat_jax.layers import MLP, RMSNorm
from longcat_jax.mla import MLA, attention_mask
from longcat_jax.moe import MoE


@dataclasses.dataclass(frozen=True)
class Context:
    """What every sublayer of one forward call shares."""

    positions: jax.Array  # [B, T] absolute positions of the new tokens
    inv_freq: jax.Array  # [Hr/2] RoPE frequencies
    cache_len: jax.Array | None = None  # int32 scalar when extending a cache, else None


def attention_sublayer(attn: MLA, indexer: Indexer | None, x, ctx: Context, cfg: Config,
                       cache: dict | None = None, indices=None):
    """One MLA sublayer with LSA selection.

    x [B,T,D] is the normed input. Without a cache the keys are the new tokens; with a cache (a dict holding this
    sublayer's c_kv [B,S,R], k_rope [B,S,Hr] and, for an owner, index_k [B,S,J]) the new rows are written at
    ctx.cache_len and attention runs in absorbed form over the cache. An owner (indexer given) computes the top-k
    indices; a reuse sublayer receives its owner's `indices`. Returns (out [B,T,D], new cache dict, indices).
    """
    B, T, _ = x.shape
    q_nope, q_rope, c_q, c_kv, k_rope = attn.latents(x, ctx.positions, ctx.inv_freq)
    if indexer is not None:
        q_i, k_i, w_i = indexer.project(x, c_q, ctx.positions)
    new_cache = None
    if cache is None:
        k_pos, k_valid = ctx.positions, None
    else:
        start = (0, ctx.cache_len, 0)
        c_kv = jax.lax.dynamic_update_slice(cache["c_kv"], c_kv.astype(cache["c_kv"].dtype), start)
        k_rope = jax.lax.dynamic_update_slice(cache["k_rope"], k_rope.astype(cache["k_rope"].dtype), start)
        new_cache = {"c_kv": c_kv, "k_rope": k_rope}
        if indexer is not None:
            k_i = jax.lax.dynamic_update_slice(cache["index_k"], k_i.astype(cache["index_k"].dtype), start)
            new_cache["index_k"] = k_i
        S = c_kv.shape[1]
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        k_valid = k_pos < ctx.cache_len + T
    mask = attention_mask(ctx.positions, k_pos, k_valid)
    if cfg.use_indexer:
        if indexer is not None:
            indices = select(q_i, k_i, w_i, ctx.positions, k_pos, cfg, k_valid)
        mask = mask & indices_to_mask(indices, mask.shape[-1])
    out = attn.attend(q_nope, q_rope, c_kv.astype(x.dtype), k_rope.astype(x.dtype), mask, absorbed=cache is not None)
    return out, new_cache, indices


class DecoderLayer(nnx.Module):
    """Two MLA sublayers, two dense SwiGLU MLPs and one shortcut MoE."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_in0, self.norm_in1 = RMSNorm(D, eps, cfg), RMSNorm(D, eps, cfg)
        self.norm_post0, self.norm_post1 = RMSNorm(D, eps, cfg), RMSNorm(D, eps, cfg)
        self.attn0, self.attn1 = MLA(cfg, rngs), MLA(cfg, rngs)
        self.indexer0 = Indexer(cfg, rngs) if cfg.indexer_sublayers >= 1 else None
        self.indexer1 = Indexer(cfg, rngs) if cfg.indexer_sublayers == 2 else None
        self.mlp0, self.mlp1 = MLP(cfg, cfg.ffn_hidden_size, rngs), MLP(cfg, cfg.ffn_hidden_size, rngs)
        self.moe = MoE(cfg, rngs)
        self.cfg = cfg

    def __call__(self, h, ctx: Context, cache: dict | None = None):
        """h [B,T,D] -> (y [B,T,D], new layer cache or None). `cache` holds this layer's slices (see model.py)."""
        cfg = self.cfg
        sub = [None, None] if cache is None else [_sublayer_cache(cache, i, cfg) for i in (0, 1)]
        with jax.named_scope("attn0"):
            out, c0, idx = attention_sublayer(self.attn0, self.indexer0, self.norm_in0(h), ctx, cfg, sub[0])
        a = h + out
        u = self.norm_post0(a)
        with jax.named_scope("moe"):
            m = self.moe(u)
        b = a + self.mlp0(u)
        with jax.named_scope("attn1"):
            reuse = idx if self.indexer1 is None else None
            out, c1, _ = attention_sublayer(self.attn1, self.indexer1, self.norm_in1(b), ctx, cfg, sub[1], reuse)
        c = b + out
        y = c + self.mlp1(self.norm_post1(c)) + m
        new_cache = None if cache is None else _merge_sublayer_caches(c0, c1, cfg)
        return y, new_cache


def _sublayer_cache(cache: dict, i: int, cfg: Config) -> dict:
    out = {"c_kv": cache["c_kv"][i], "k_rope": cache["k_rope"][i]}
    if cfg.use_indexer and i < cfg.indexer_sublayers:
        out["index_k"] = cache["index_k"][i]
    return out


def _merge_sublayer_caches(c0: dict, c1: dict, cfg: Config) -> dict:
    out = {"c_kv": jnp.stack([c0["c_kv"], c1["c_kv"]]), "k_rope": jnp.stack([c0["k_rope"], c1["k_rope"]])}
    if cfg.use_indexer:
        out["index_k"] = jnp.stack([c["index_k"] for c in (c0, c1) if "index_k" in c])
    return out
