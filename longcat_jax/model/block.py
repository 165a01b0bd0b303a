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
from jax.ad_checkpoint import checkpoint_name

from longcat_jax.config import Config
from longcat_jax.model.dense_warmup import dense_attention, dense_indexer_stats
from longcat_jax.model.indexer import Indexer, indexer_scores, indices_to_mask, select
from longcat_jax.model.indexer_loss import attention_recall, indexer_kl, selection_recall
from longcat_jax.model.layers import MLP, RMSNorm
from longcat_jax.model.mla import MLA, absorb_query, attention_mask
from longcat_jax.model.moe import MoE
from pallas_kernels import si_window
from pallas_kernels.indexer_kl import sparse_indexer_kl
from pallas_kernels.sparse_mla import sparse_mla


@dataclasses.dataclass(frozen=True)
class Context:
    """What every sublayer of one forward call shares."""

    positions: jax.Array  # [B, T] RoPE positions of the new tokens (restart at 0 in each packed document)
    inv_freq: jax.Array  # [Hr/2] RoPE frequencies
    cache_len: jax.Array | None = None  # int32 scalar when extending a cache, else None
    # Packed training rows: positions restart in every document, so "causal by position and same document" is
    # exactly per-document causality, and the SI sinks and local window are each document's own.
    segment_ids: jax.Array | None = None  # [B, T] document ids, 0 = padding
    # Also return the indexer KL, expert statistics and (see below) selection recall.
    collect_aux: bool = False
    dense_attention: bool = False  # indexer warm-up: attend to every causal key, train the indexer densely
    # Sparse stage only (the warm-up's dense attention gives the recall for free): also measure the selection
    # recall against the dense attention (`indexer_loss.selection_recall`, O(T x S) work in linear memory). A
    # static flag, so a trainer compiles a second program and pays for it only at the steps it logs.
    measure_recall: bool = False

    @property
    def query_mask(self):
        return None if self.segment_ids is None else self.segment_ids > 0


def attention_sublayer(attn: MLA, indexer: Indexer | None, x, ctx: Context, cfg: Config,
                       cache: dict | None = None, indices=None):
    """One MLA sublayer with LSA selection.

    x [B,T,D] is the normed input. Without a cache the keys are the new tokens; with a cache (a dict holding
    this sublayer's c_kv [B,S,R], k_rope [B,S,Hr] and, for an owner, index_k [B,S,J]) the new rows are written
    at ctx.cache_len and attention runs in absorbed form over the cache. An owner (indexer given) computes the
    top-k indices; a reuse sublayer receives its owner's `indices`. The indexer reads detached inputs: its
    selection is discrete, and it learns only from its own KL loss (SPEC 3.10).

    With cfg.kernel_impl set (not "reference"), selection and attention run through memory-bounded paths (no
    [T, S] tensor): past the dense warm-up the pallas_kernels ones, and aux then holds the slot probabilities
    instead; in the warm-up (no cache) the blockwise dense attention of `dense_warmup`, and aux then
    holds the latents, from which `indexer_aux` recomputes the attention block by block.

    Returns (out [B,T,D], new cache dict or None, indices [B,T,K] or None, aux). With ctx.collect_aux, aux
    holds "probs" (head-mean attention [B,T,S]), "allowed" (causal and same-document keys), "selected" (the
    LSA mask) and, for an owner, "scores" (indexer logits); with ctx.measure_recall in the sparse stage, on
    either path, also "recall" (`_measured_recall`); otherwise aux is empty.
    """
    B, T, _ = x.shape
    q_nope, q_rope, c_q, c_kv, k_rope = attn.latents(x, ctx.positions, ctx.inv_freq)
    if indexer is not None:
        q_i, k_i, w_i = indexer.project(jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q), ctx.positions)
    new_cache = None
    q_pos = ctx.positions
    if cache is None:
        k_pos, k_valid = q_pos, None
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
    if cfg.use_indexer and cfg.kernel_impl != "reference" and not (ctx.dense_attention and cache is not None):
        seg = ctx.segment_ids if cache is None else None
        q_offset = 0 if cache is None else ctx.cache_len
        if indexer is not None:
            # Under SI the local window is read as a contiguous band (pallas_kernels.si_window), so it leads
            # the index set by offset and the indexer ranks only the other K - window slots.
            indices = si_window.select(q_i, k_i, w_i, q_pos, k_pos, cfg, q_offset, k_valid=k_valid,
                                       q_segment_ids=seg, k_segment_ids=seg, impl=cfg.kernel_impl)
        if ctx.dense_attention:  # the warm-up attends to every key; the selection only feeds the recall
            q_lat = absorb_query(q_nope, attn.w_kv_up[...], cfg)
            o_lat = dense_attention(q_lat, q_rope, c_kv.astype(x.dtype), k_rope.astype(x.dtype),
                                    cfg.softmax_scale, q_pos, ctx.segment_ids)
            aux = {}
            if ctx.collect_aux:
                aux = {"latents": (q_lat, q_rope, c_kv, k_rope), "indices": indices}
                if indexer is not None:
                    aux["index_qkw"] = (q_i, k_i, w_i)
            return latent_output(attn, o_lat), new_cache, indices, aux
        out, slot_probs = attend_selected(attn, q_nope, q_rope, c_kv.astype(x.dtype), k_rope.astype(x.dtype),
                                          indices, ctx.collect_aux, si_window.window_size(cfg), q_offset)
        aux = {}
        if ctx.collect_aux:
            aux = {"slot_probs": jax.lax.stop_gradient(slot_probs), "indices": indices}
            if indexer is not None:
                aux["index_qkw"] = (q_i, k_i, w_i)
            latents = (q_nope, q_rope, c_kv, k_rope)
            aux.update(_measured_recall(attn, latents, indices, q_pos, k_pos, k_valid, ctx))
        return out, new_cache, indices, aux
    key_valid = k_valid  # [B, S] or None, before packed documents make it per query
    if cache is None and ctx.segment_ids is not None:
        k_valid = ctx.segment_ids[:, :, None] == ctx.segment_ids[:, None, :]  # [B, T, S]
    allowed = attention_mask(q_pos, k_pos, k_valid)
    mask, selected = allowed, None
    if cfg.use_indexer:
        if indexer is not None:
            indices = select(q_i, k_i, w_i, q_pos, k_pos, cfg, k_valid)
        selected = indices_to_mask(indices, allowed.shape[-1]) & allowed
        if not ctx.dense_attention:
            mask = selected
    out, probs = attn.attend(q_nope, q_rope, c_kv.astype(x.dtype), k_rope.astype(x.dtype), mask,
                             absorbed=cache is not None)
    aux = {}
    if ctx.collect_aux:
        aux = {"probs": jax.lax.stop_gradient(probs), "allowed": allowed, "selected": selected}
        if indexer is not None:
            aux["scores"] = indexer_scores(q_i, k_i, w_i, q_pos, k_pos, k_valid)
        if cfg.use_indexer:
            latents = (q_nope, q_rope, c_kv, k_rope)
            aux.update(_measured_recall(attn, latents, indices, q_pos, k_pos, key_valid, ctx))
    return out, new_cache, indices, aux


def _measured_recall(attn: MLA, latents, indices, q_pos, k_pos, k_valid, ctx: Context):
    """{"recall": scalar} in the sparse stage with ctx.measure_recall, else {}. This sublayer attended over
    its selection only, so the dense scores are recomputed from latents = (q_nope, q_rope, c_kv, k_rope) in
    absorbed form."""
    if not ctx.measure_recall or ctx.dense_attention or ctx.cache_len is not None:
        return {}
    cfg = attn.cfg
    q_nope, q_rope, c_kv, k_rope = latents
    q_lat = absorb_query(q_nope, attn.w_kv_up[...], cfg)
    args = [jax.lax.stop_gradient(a) for a in (q_lat, q_rope, c_kv, k_rope)]
    return {"recall": selection_recall(*args, indices, cfg.softmax_scale, q_pos, k_pos, k_valid=k_valid,
                                       segment_ids=ctx.segment_ids, query_mask=ctx.query_mask)}


def attend_selected(attn: MLA, q_nope, q_rope, c_kv, k_rope, indices, return_probs: bool, window: int = 0,
                    q_offset=0):
    """Absorbed MLA over the selected latent rows only (pallas_kernels.sparse_mla, cfg.kernel_impl): never a
    [T, S] tensor; with `window`, indices lead with the SI window by offset. Returns (out [B,T,D], head-mean
    probs [B,T,K] of each slot or None)."""
    cfg = attn.cfg
    q_lat = absorb_query(q_nope, attn.w_kv_up[...], cfg)
    out = sparse_mla(q_lat, q_rope, c_kv, k_rope, indices, cfg.softmax_scale, window=window,
                     q_offset=q_offset, impl=cfg.kernel_impl, return_probs=return_probs)
    o_lat, probs = out if return_probs else (out, None)
    return latent_output(attn, o_lat), probs


def latent_output(attn: MLA, o_lat):
    """The sublayer output [B,T,D] from absorbed attention's latent sums o_lat [B,T,N,R]: W_UV, then W_O."""
    dt = o_lat.dtype
    w_uv = attn.w_kv_up[...][..., attn.cfg.qk_nope_head_dim :]
    o = jnp.einsum("btnr,rnh->btnh", o_lat, w_uv.astype(dt))
    return jnp.einsum("btnh,nhd->btd", o, attn.w_o[...].astype(dt))


def indexer_aux(owner_aux: dict, served: list[dict], ctx: Context, cfg: Config) -> dict:
    """KL loss of one indexer against the mean attention of the sublayers it serves, plus selection recall.

    On the kernel path (cfg.kernel_impl) the served sublayers report their attention at the owner's K slots
    only, so the sparse-stage KL runs over those slots (pallas_kernels.indexer_kl); in the warm-up they report
    their latents, and the dense KL and the recall come from one blockwise pass
    (dense_warmup.dense_indexer_stats). The recall (the share of the dense attention mass the selection keeps)
    comes from the warm-up's dense attention, or in the sparse stage from the served sublayers' own
    measurement (ctx.measure_recall); without either it is not reported.
    """
    if "latents" in owner_aux:  # the kernel path's warm-up: KL and recall in one blockwise pass
        kl, recall = dense_indexer_stats(owner_aux["index_qkw"], [a["latents"] for a in served],
                                         owner_aux["indices"], cfg.softmax_scale, ctx.positions,
                                         ctx.segment_ids, ctx.query_mask)
        return {"indexer_kl": kl, "indexer_recall": recall}
    if "slot_probs" in owner_aux:
        target = sum(a["slot_probs"] for a in served) / len(served)
        q_i, k_i, w_i = owner_aux["index_qkw"]
        out = {"indexer_kl": sparse_indexer_kl(q_i, k_i, w_i, owner_aux["indices"], target, ctx.query_mask,
                                               impl=cfg.kernel_impl)}
    else:
        target = sum(a["probs"] for a in served) / len(served)
        allowed = owner_aux["allowed"] if ctx.dense_attention else owner_aux["selected"]
        out = {"indexer_kl": indexer_kl(owner_aux["scores"], target, allowed, ctx.query_mask)}
    if ctx.dense_attention:
        recalls = [attention_recall(a["probs"], a["selected"], ctx.query_mask) for a in served]
    else:  # the sparse stage's probabilities cover the selected keys only: they would always give 1.0
        recalls = [a["recall"] for a in served if "recall" in a]
    if recalls:
        out["indexer_recall"] = sum(recalls) / len(recalls)
    return out


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
        """h [B,T,D] -> (y [B,T,D], new layer cache or None, aux dict). `cache` holds this layer's slices."""
        cfg = self.cfg
        sub = [None, None] if cache is None else [_sublayer_cache(cache, i, cfg) for i in (0, 1)]
        with jax.named_scope("attn0"):
            out, c0, idx, aux0 = attention_sublayer(self.attn0, self.indexer0, self.norm_in0(h), ctx, cfg,
                                                    sub[0])
        a = h + checkpoint_name(out, "attn_out")
        u = self.norm_post0(a)
        with jax.named_scope("moe"):
            m, load, balance = self.moe.forward(u, ctx.query_mask)
        b = a + checkpoint_name(self.mlp0(u), "mlp_out")
        with jax.named_scope("attn1"):
            reuse = idx if self.indexer1 is None else None
            out, c1, _, aux1 = attention_sublayer(self.attn1, self.indexer1, self.norm_in1(b), ctx, cfg,
                                                  sub[1], reuse)
        c = b + checkpoint_name(out, "attn_out")
        y = c + checkpoint_name(self.mlp1(self.norm_post1(c)), "mlp_out") + checkpoint_name(m, "moe_out")
        new_cache = None if cache is None else _merge_sublayer_caches(c0, c1, cfg)
        aux = {}
        if ctx.collect_aux:
            aux = {"expert_load": load, "balance_loss": balance}
            if cfg.use_indexer:
                owners = [indexer_aux(aux0, [aux0, aux1] if self.indexer1 is None else [aux0], ctx, cfg)]
                if self.indexer1 is not None:
                    owners.append(indexer_aux(aux1, [aux1], ctx, cfg))
                aux["indexer_kl"] = sum(o["indexer_kl"] for o in owners)
                if "indexer_recall" in owners[0]:
                    aux["indexer_recall"] = sum(o["indexer_recall"] for o in owners) / len(owners)
        return y, new_cache, aux


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
