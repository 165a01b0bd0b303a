"""The ScMoE decoder layer (docs/architecture.md#scmoe) and the sparse-attention sublayer it is built from
(docs/architecture.md#lsa).

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
from longcat_jax.model import context_parallel
from longcat_jax.model.cache import Keys
from longcat_jax.model.dense_warmup import dense_attention, dense_indexer_stats
from longcat_jax.model.indexer import Indexer, select
from longcat_jax.model.indexer_loss import attention_recall, indexer_kl, selection_recall
from longcat_jax.model.layers import MLP, RMSNorm
from longcat_jax.model.mla import MLA
from longcat_jax.model.moe import MoE
from longcat_jax.model.paged_attention import paged_attention, paged_keys
from longcat_jax.ops.indexer_scores import indexer_scores
from longcat_jax.ops.masks import attention_mask, indices_to_mask
from pallas_kernels import si_window
from pallas_kernels.indexer_kl import sparse_indexer_kl
from pallas_kernels.sparse_mla import sparse_mla
from sharding.rules import RULES


@dataclasses.dataclass(frozen=True)
class Context:
    """What every sublayer of one forward call shares."""

    positions: jax.Array  # [B, T] RoPE positions of the new tokens (restart at 0 in each packed document)
    inv_freq: jax.Array  # [Hr/2] RoPE frequencies
    # int32 when extending a cache, else None: a scalar for the linear cache, [B] per sequence for the paged
    cache_len: jax.Array | None = None
    # The paged cache (cache.PagedCache): each sequence's page table [B, W] and how many of its T tokens are
    # real [B] (the rest pad the row to a compiled shape and are neither written nor attended to).
    page_table: jax.Array | None = None
    new_lens: jax.Array | None = None
    # Packed training rows: positions restart in every document, so "causal by position and same document" is
    # exactly per-document causality, and the SI sinks and local window are each document's own. Padding
    # (segment 0, every position 0) is no document: its keys are invalid for every query (`query_mask`).
    segment_ids: jax.Array | None = None  # [B, T] document ids, 0 = padding
    # Also return the indexer KL, expert statistics and (see below) selection recall.
    collect_aux: bool = False
    dense_attention: bool = False  # indexer warm-up: attend to every causal key, train the indexer densely
    # Sparse stage only (the warm-up's dense attention gives the recall for free): also measure the selection
    # recall against the dense attention (`indexer_loss.selection_recall`, O(T x S) work in linear memory). A
    # static flag, so a trainer compiles a second program and pays for it only at the steps it logs.
    measure_recall: bool = False
    # The logical -> mesh table the model was built under (LongCat.rules): the MoE finds its expert axes in
    # it.
    rules: tuple = RULES
    # Context parallelism (forward only): how the token axis is laid out over the shards of its mesh axis;
    # attention then gathers its keys (docs/architecture.md#context-parallel). None = the axis is not split.
    cp: context_parallel.Layout | None = None

    @property
    def query_mask(self):
        """bool [B, T] or None: the real tokens, the queries whose losses and statistics count and the new
        tokens that are keys at all; padding is neither. As one more document, all at position 0, a padding
        query would see the later padding rows too (the kernels' SI window band reads only the rows before it)
        and HI would pool padding keys into block 0 for every real query."""
        return None if self.segment_ids is None else self.segment_ids > 0

    def laid_out(self, layout: context_parallel.Layout) -> Context:
        """This context (natural order, no cache) for tokens in `layout`: positions and document ids move
        with them."""
        move = layout.from_natural
        segment_ids = None if self.segment_ids is None else move(self.segment_ids)
        return dataclasses.replace(self, positions=move(self.positions), segment_ids=segment_ids, cp=layout)


# --- What each attention path reports (with ctx.collect_aux) for the indexer's loss and the recall ---------


@dataclasses.dataclass(frozen=True)
class ReferenceAux:
    """The reference path's [T, S] tensors."""

    probs: jax.Array  # [B,T,S] head-mean attention (stop-gradient)
    allowed: jax.Array  # [B,T,S] causal, valid, same-document keys
    selected: jax.Array | None  # [B,T,S] the LSA selection within `allowed`; None without an indexer
    scores: jax.Array | None = None  # [B,T,S] indexer logits, owner sublayers only
    recall: jax.Array | None = None  # measured selection recall (sparse stage with ctx.measure_recall)


@dataclasses.dataclass(frozen=True)
class SparseKernelAux:
    """The kernel path past the warm-up: attention only at the K selected slots."""

    slot_probs: jax.Array  # [B,T,K] head-mean attention of each slot (stop-gradient)
    indices: jax.Array  # [B,T,K] the selection
    index_qkw: tuple | None  # the owner's indexer (q, k, w); None for a reuse sublayer
    recall: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class DenseWarmupAux:
    """The kernel path in the warm-up: the latents, from which `indexer_aux` recomputes the dense attention
    one query block at a time."""

    latents: tuple  # (q_lat, q_rope, c_kv, k_rope)
    indices: jax.Array
    index_qkw: tuple | None


SublayerAux = ReferenceAux | SparseKernelAux | DenseWarmupAux


def attention_sublayer(attn: MLA, indexer: Indexer | None, x, ctx: Context, cfg: Config,
                       cache: dict | None = None, indices=None):
    """One MLA sublayer with LSA selection.

    x [B,T,D] is the normed input. Without a cache the keys are the new tokens; with a cache (a dict holding
    this sublayer's c_kv [B,S,R], k_rope [B,S,Hr] and, for an owner, index_k [B,S,J]) the new rows are written
    at ctx.cache_len and attention runs in absorbed form over the cache. An owner (indexer given) computes the
    top-k indices; a reuse sublayer receives its owner's `indices`. The indexer reads detached inputs: its
    selection is discrete, and it learns only from its own KL loss.

    One of three paths attends (`attention_path`): the reference, the kernels' sparse path, or the kernels'
    dense warm-up. Under context parallelism (ctx.cp) the queries stay split over the sequence's mesh axis and
    the keys are all-gathered over it (`_gather_keys`, docs/architecture.md#context-parallel). Returns
    (out [B,T,D], new cache dict or None, indices [B,T,K] or None, aux): aux is None unless ctx.collect_aux,
    else the path's `SublayerAux`.
    """
    q_nope, q_rope, c_q, c_kv, k_rope = attn.latents(x, ctx.positions, ctx.inv_freq)
    index_qkw = None
    if indexer is not None:
        index_qkw = indexer.project(jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q), ctx.positions)
    if ctx.page_table is not None:
        keys, index_qkw, new_cache = paged_keys(cache, c_kv, k_rope, index_qkw, ctx, x.dtype)
        path = paged_attention
    else:
        keys, index_qkw, new_cache = _write_cache(cache, c_kv, k_rope, index_qkw, ctx, x.dtype)
        path = attention_path(cfg, ctx, cache is not None)
    out, indices, aux = path(attn, q_nope, q_rope, keys, index_qkw, indices, ctx)
    return out, new_cache, indices, aux


def attention_path(cfg: Config, ctx: Context, has_cache: bool):
    """The reference path (materialises [T, S] scores, the selection as a mask) unless cfg.kernel_impl asks
    for the memory-bounded paths of an indexed model; those never form a [T, S] tensor: the dense warm-up
    without a cache, else sparse attention over the selected rows. The warm-up extending a cache (a decode
    test of a warm-up model) stays on the reference path."""
    if not cfg.use_indexer or cfg.kernel_impl == "reference" or (ctx.dense_attention and has_cache):
        return reference_attention
    return dense_warmup_attention if ctx.dense_attention else sparse_kernel_attention


def _write_cache(cache, c_kv, k_rope, index_qkw, ctx: Context, dtype):
    """(the keys to attend over in `dtype`, the owner's indexer (q, k, w) with k over every key, the new cache
    or None). Without a cache the keys are the new tokens', already in `dtype`."""
    B, T = ctx.positions.shape
    if cache is None:
        if ctx.cp is not None:
            c_kv, k_rope, index_qkw = _gather_keys(c_kv, k_rope, index_qkw, ctx.cp)
        return Keys(c_kv, k_rope, ctx.positions, None, 0), index_qkw, None

    def write(name, rows):
        start = (0, ctx.cache_len, 0)
        return jax.lax.dynamic_update_slice(cache[name], rows.astype(cache[name].dtype), start)

    new_cache = {"c_kv": write("c_kv", c_kv), "k_rope": write("k_rope", k_rope)}
    if index_qkw is not None:  # the indexer scores its keys in the cache's dtype
        q_i, k_i, w_i = index_qkw
        index_qkw = (q_i, write("index_k", k_i), w_i)
        new_cache["index_k"] = index_qkw[1]
    S = new_cache["c_kv"].shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    keys = Keys(new_cache["c_kv"].astype(dtype), new_cache["k_rope"].astype(dtype), k_pos,
                k_pos < ctx.cache_len + T, ctx.cache_len)
    return keys, index_qkw, new_cache


def _gather_keys(c_kv, k_rope, index_qkw, layout: context_parallel.Layout):
    """Context parallelism: every shard's queries attend over every key, so the keys are all-gathered over the
    shards on purpose (docs/architecture.md#context-parallel), the latents in one collective of R + Hr values
    per token (576 for LongCat-2.0), the owner's indexer keys in another of J. Queries stay split."""
    R = c_kv.shape[-1]
    kv = layout.gather(jnp.concatenate([c_kv, k_rope], axis=-1), ("batch", "seq", "kv_lora"))
    if index_qkw is not None:
        q_i, k_i, w_i = index_qkw
        index_qkw = (q_i, layout.gather(k_i, ("batch", "seq", "head_dim")), w_i)
    return kv[..., :R], kv[..., R:], index_qkw


def reference_attention(attn: MLA, q_nope, q_rope, keys: Keys, index_qkw, indices, ctx: Context):
    """Selection by `indexer.select` over [T, S] scores, applied as a mask to dense MLA (absorbed form over a
    cache). Returns (out [B,T,D], indices or None, ReferenceAux or None)."""
    cfg = attn.cfg
    q_pos, k_valid = ctx.positions, keys.valid
    if keys.valid is None and ctx.segment_ids is not None:  # [B, T, S]: same document, padding keys invalid
        k_valid = (ctx.segment_ids[:, :, None] == ctx.segment_ids[:, None, :]) & ctx.query_mask[:, None, :]
    allowed = attention_mask(q_pos, keys.positions, k_valid)
    mask, selected = allowed, None
    if cfg.use_indexer:
        if index_qkw is not None:
            indices = _reference_select(index_qkw, keys, ctx, cfg)
        selected = indices_to_mask(indices, allowed.shape[-1]) & allowed
        if not ctx.dense_attention:
            mask = selected
    out, probs = attn.attend(q_nope, q_rope, keys.c_kv, keys.k_rope, mask, absorbed=keys.valid is not None)
    if not ctx.collect_aux:
        return out, indices, None
    scores = None if index_qkw is None else indexer_scores(*index_qkw, q_pos, keys.positions, k_valid)
    recall = None
    if cfg.use_indexer:
        recall = _measured_recall(attn, (q_nope, q_rope, keys.c_kv, keys.k_rope), indices, keys, ctx)
    return out, indices, ReferenceAux(jax.lax.stop_gradient(probs), allowed, selected, scores, recall)


def sparse_kernel_attention(attn: MLA, q_nope, q_rope, keys: Keys, index_qkw, indices, ctx: Context):
    """Selection by `si_window.select` and absorbed MLA over the selected latent rows only
    (`pallas_kernels`, cfg.kernel_impl). Returns (out, indices, SparseKernelAux or None)."""
    cfg = attn.cfg
    if index_qkw is not None:
        indices = _kernel_select(index_qkw, keys, ctx, cfg)
    out, slot_probs = attend_selected(attn, q_nope, q_rope, keys.c_kv, keys.k_rope, indices, ctx.collect_aux,
                                      si_window.window_size(cfg), keys.q_offset, ctx.cp)
    if not ctx.collect_aux:
        return out, indices, None
    recall = _measured_recall(attn, (q_nope, q_rope, keys.c_kv, keys.k_rope), indices, keys, ctx)
    return out, indices, SparseKernelAux(jax.lax.stop_gradient(slot_probs), indices, index_qkw, recall)


def dense_warmup_attention(attn: MLA, q_nope, q_rope, keys: Keys, index_qkw, indices, ctx: Context):
    """The warm-up on the kernel path: blockwise dense absorbed MLA over every causal, same-document key
    (`dense_warmup`); the selection only feeds the indexer's statistics. No cache. Returns (out, indices,
    DenseWarmupAux or None)."""
    cfg = attn.cfg
    if index_qkw is not None:
        indices = _kernel_select(index_qkw, keys, ctx, cfg)
    q_lat = attn.absorb_query(q_nope)
    o_lat = dense_attention(q_lat, q_rope, keys.c_kv, keys.k_rope, cfg.softmax_scale, ctx.positions,
                            ctx.segment_ids)
    out = attn.latent_output(o_lat)
    if not ctx.collect_aux:
        return out, indices, None
    return out, indices, DenseWarmupAux((q_lat, q_rope, keys.c_kv, keys.k_rope), indices, index_qkw)


def _reference_select(index_qkw, keys: Keys, ctx: Context, cfg: Config):
    """The owner's selection by `indexer.select` over [T, S] scores: the cache's written rows, or the packed
    documents with the padding keys invalid (so HI's block means do not pool them either)."""
    if ctx.cp is None:
        if keys.valid is None and ctx.segment_ids is not None:
            seg = ctx.segment_ids
            return select(*index_qkw, ctx.positions, keys.positions, cfg, ctx.query_mask, q_segment_ids=seg,
                          k_segment_ids=seg)
        return select(*index_qkw, ctx.positions, keys.positions, cfg, keys.valid)

    def select_chunk(q, k, w, q_pos, k_pos, q_seg, k_seg, offset):
        return select(q, k, w, q_pos, k_pos, cfg, k_seg > 0, q_segment_ids=q_seg, k_segment_ids=k_seg)

    return _chunked_select(select_chunk, index_qkw, keys, ctx)


def _kernel_select(index_qkw, keys: Keys, ctx: Context, cfg: Config):
    """The owner's selection in linear memory. Under SI the local window is read as a contiguous band
    (pallas_kernels.si_window), so it leads the index set by offset and the indexer ranks only the other
    K - window slots."""
    if ctx.cp is None:
        seg = ctx.segment_ids if keys.valid is None else None
        k_valid = keys.valid if seg is None else ctx.query_mask
        return si_window.select(*index_qkw, ctx.positions, keys.positions, cfg, keys.q_offset,
                                k_valid=k_valid, q_segment_ids=seg, k_segment_ids=seg, impl=cfg.kernel_impl)

    def select_chunk(q, k, w, q_pos, k_pos, q_seg, k_seg, offset):
        return si_window.select(q, k, w, q_pos, k_pos, cfg, offset, k_valid=k_seg > 0, q_segment_ids=q_seg,
                                k_segment_ids=k_seg, impl=cfg.kernel_impl)

    return _chunked_select(select_chunk, index_qkw, keys, ctx)


def _chunked_select(select_chunk, index_qkw, keys: Keys, ctx: Context):
    """An owner's selection under context parallelism (no cache): per chunk of queries over the gathered keys
    in natural order (`context_parallel.per_chunk`), so that the SI window's rows, HI's key index and top-k's
    tie-break to the lower row are one device's; returns int [B,T,K] rows of the keys in layout order.

    select_chunk(q, k, w, q_positions, k_positions, q_segment_ids, k_segment_ids, offset) -> int [B,C,K]
    natural rows, offset the chunk's first natural row."""
    layout, (q, k, w) = ctx.cp, index_qkw
    # Without packed documents every token is in document 1: the same selection as no document ids (segment 0
    # would be padding, an invalid key).
    seg = jnp.ones_like(ctx.positions) if ctx.segment_ids is None else ctx.segment_ids

    def one_chunk(queries, natural_keys, offset):
        (q, w, q_pos, q_seg), (k, k_pos, k_seg) = queries, natural_keys
        return layout.to_layout_rows(select_chunk(q, k, w, q_pos, k_pos, q_seg, k_seg, offset))

    return context_parallel.per_chunk(layout, one_chunk, (q, w, ctx.positions, seg), (k, keys.positions, seg))


def _measured_recall(attn: MLA, latents, indices, keys: Keys, ctx: Context):
    """The selection recall in the sparse stage with ctx.measure_recall (no cache), else None. The sublayer
    attended over its selection only, so the dense scores are recomputed from latents = (q_nope, q_rope, c_kv,
    k_rope) in absorbed form."""
    if not ctx.measure_recall or ctx.dense_attention or ctx.cache_len is not None:
        return None
    cfg = attn.cfg
    q_nope, q_rope, c_kv, k_rope = latents
    q_lat = attn.absorb_query(q_nope)
    args = [jax.lax.stop_gradient(a) for a in (q_lat, q_rope, c_kv, k_rope)]
    return selection_recall(*args, indices, cfg.softmax_scale, ctx.positions, keys.positions,
                            k_valid=keys.valid, segment_ids=ctx.segment_ids, query_mask=ctx.query_mask)


def attend_selected(attn: MLA, q_nope, q_rope, c_kv, k_rope, indices, return_probs: bool, window: int = 0,
                    q_offset=0, layout: context_parallel.Layout | None = None):
    """Absorbed MLA over the selected latent rows only (pallas_kernels.sparse_mla, cfg.kernel_impl): never a
    [T, S] tensor; with `window`, indices lead with the SI window by offset. Under context parallelism
    (`layout`; c_kv, k_rope gathered, indices rows of them in layout order) it runs per chunk of queries over
    the keys in natural order, where each chunk's window is the band of rows before it. Returns
    (out [B,T,D], head-mean probs [B,T,K] of each slot or None)."""
    cfg = attn.cfg
    q_lat = attn.absorb_query(q_nope)

    def attend(q_lat, q_rope, c_kv, k_rope, indices, q_offset):
        return sparse_mla(q_lat, q_rope, c_kv, k_rope, indices, cfg.softmax_scale, window=window,
                          q_offset=q_offset, impl=cfg.kernel_impl, return_probs=return_probs)

    if layout is None:
        out = attend(q_lat, q_rope, c_kv, k_rope, indices, q_offset)
    else:
        def one_chunk(queries, natural_keys, offset):
            q_lat, q_rope, indices = queries
            return attend(q_lat, q_rope, *natural_keys, layout.to_natural_rows(indices), offset)

        out = context_parallel.per_chunk(layout, one_chunk, (q_lat, q_rope, indices), (c_kv, k_rope))
    o_lat, probs = out if return_probs else (out, None)
    return attn.latent_output(o_lat), probs


def indexer_aux(owner: SublayerAux, served: list[SublayerAux], ctx: Context, cfg: Config) -> dict:
    """KL loss of one indexer against the mean attention of the sublayers it serves, plus selection recall.

    On the kernel path the served sublayers report their attention at the owner's K slots only, so the
    sparse-stage KL runs over those slots (pallas_kernels.indexer_kl); in the warm-up they report their
    latents, and the dense KL and the recall come from one blockwise pass (dense_warmup.dense_indexer_stats).
    The recall (the share of the dense attention mass the selection keeps) comes from the warm-up's dense
    attention, or in the sparse stage from the served sublayers' own measurement (ctx.measure_recall);
    without either it is not reported.
    """
    if isinstance(owner, DenseWarmupAux):  # KL and recall in one blockwise pass
        kl, recall = dense_indexer_stats(owner.index_qkw, [a.latents for a in served], owner.indices,
                                         cfg.softmax_scale, ctx.positions, ctx.segment_ids, ctx.query_mask)
        return {"indexer_kl": kl, "indexer_recall": recall}
    if isinstance(owner, SparseKernelAux):
        target = sum(a.slot_probs for a in served) / len(served)
        out = {"indexer_kl": _sparse_kl(owner.index_qkw, owner.indices, target, ctx, cfg)}
    else:
        target = sum(a.probs for a in served) / len(served)
        allowed = owner.allowed if ctx.dense_attention else owner.selected
        out = {"indexer_kl": indexer_kl(owner.scores, target, allowed, ctx.query_mask)}
    if ctx.dense_attention:
        recalls = [attention_recall(a.probs, a.selected, ctx.query_mask) for a in served]
    else:  # the sparse stage's probabilities cover the selected keys only: they would always give 1.0
        recalls = [a.recall for a in served if a.recall is not None]
    if recalls:
        out["indexer_recall"] = sum(recalls) / len(recalls)
    return out


def _sparse_kl(index_qkw, indices, target, ctx: Context, cfg: Config):
    """The sparse-stage KL (`pallas_kernels.indexer_kl`); under context parallelism each shard takes its
    queries' mean over the gathered keys and the means are weighted by query count."""
    q, k, w = index_qkw

    def kl(queries, k, query_mask):
        q, w, indices, target = queries
        return sparse_indexer_kl(q, k, w, indices, target, query_mask, impl=cfg.kernel_impl)

    if ctx.cp is None:
        return kl((q, w, indices, target), k, ctx.query_mask)
    return context_parallel.query_mean(ctx.cp, kl, (q, w, indices, target), k, ctx.query_mask)


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
        paged = cache is not None and "layer" in cache
        with jax.named_scope("attn0"):
            out, c0, idx, aux0 = attention_sublayer(self.attn0, self.indexer0, self.norm_in0(h), ctx, cfg,
                                                    None if cache is None else _sublayer_cache(cache, 0, cfg))
        a = h + checkpoint_name(out, "attn_out")
        u = self.norm_post0(a)
        with jax.named_scope("moe"):
            m, load, balance = self.moe.forward(u, ctx.query_mask, ctx.rules)
        b = a + checkpoint_name(self.mlp0(u), "mlp_out")
        with jax.named_scope("attn1"):
            reuse = idx if self.indexer1 is None else None
            out, c1, _, aux1 = attention_sublayer(self.attn1, self.indexer1, self.norm_in1(b), ctx, cfg,
                                                  None if cache is None else _sublayer_cache(cache, 1, cfg),
                                                  reuse)
        c = b + checkpoint_name(out, "attn_out")
        y = c + checkpoint_name(self.mlp1(self.norm_post1(c)), "mlp_out") + checkpoint_name(m, "moe_out")
        new_cache = None if cache is None else _merge_sublayer_caches(c0, c1, cfg, paged)
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
    """Sublayer i's view of a layer's cache. Linear: its slices of c_kv, k_rope and (owner only) index_k.
    Paged (`cache["layer"]` = the layer's index): the whole cache, read only, and the numbers of this
    sublayer's pools."""
    owner = cfg.use_indexer and i < cfg.indexer_sublayers
    if "layer" in cache:
        out = {name: cache[name] for name in ("kv", "index_k", "index_sum") if name in cache}
        out["kv_pool"] = cache["layer"] * 2 + i
        if owner:
            out["index_pool"] = cache["layer"] * cfg.indexer_sublayers + i
        return out
    out = {"c_kv": cache["c_kv"][i], "k_rope": cache["k_rope"][i]}
    if owner:
        out["index_k"] = cache["index_k"][i]
    return out


def _merge_sublayer_caches(c0: dict, c1: dict, cfg: Config, paged: bool) -> dict:
    """The layer's new cache (linear) or new rows (paged), stacked over the sublayers (the owners for the
    indexer keys)."""
    names = ("kv",) if paged else ("c_kv", "k_rope")
    out = {name: jnp.stack([c0[name], c1[name]]) for name in names}
    if cfg.use_indexer:
        out["index_k"] = jnp.stack([c["index_k"] for c in (c0, c1) if "index_k" in c])
    return out
