"""Multi-head latent attention with the LongCat LoRA scaling factors (docs/architecture.md#mla).

Two mathematically equal attention forms over the same latent cache (scaled c_kv [R] plus rotated
k_rope [Hr]):
  naive     expand keys and values per head with w_kv_up, then attend (training and prefill);
  absorbed  fold W_UK into the query and W_UV into the output, attend over the latent rows (decode and the
            sparse path).

W_UK and W_UV are slices of w_kv_up [R, N, Hn + Hv]. A batched matmul over heads reads them head-major, so
XLA copies the transposed slices out of w_kv_up in every call; a served model holds them split once
(`add_absorbed_weights`), which on CPU takes those copies out of every decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.layers import apply_rope, param, rms_norm
from longcat_jax.ops.masks import softmax_f32
from pallas_kernels import cpu_serving
from pallas_kernels.cpu_serving import heads_matmul, matmul


class Absorbed(nnx.Variable):
    """W_UK [N, Hn, R] or W_UV [N, R, Hv] split out of w_kv_up for serving; not a trained parameter."""


class MLA(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        pd, D, N = cfg.jnp_param_dtype, cfg.hidden_size, cfg.num_heads
        self.w_q_down = param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"), pd)
        self.q_norm = param(None, (cfg.q_lora_rank,), ("q_lora",), pd, init="ones")
        self.w_q_up = param(rngs, (cfg.q_lora_rank, N, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), pd)
        self.w_kv_down = param(rngs, (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), pd)
        self.kv_norm = param(None, (cfg.kv_lora_rank,), ("kv_lora",), pd, init="ones")
        self.w_kv_up = param(
            rngs, (cfg.kv_lora_rank, N, cfg.qk_nope_head_dim + cfg.v_head_dim),
            ("kv_lora", "heads", "head_dim"), pd
        )
        self.w_o = param(rngs, (N, cfg.v_head_dim, D), ("heads", "head_dim", "embed"), pd)
        self.cfg = cfg

    def latents(self, x, positions, inv_freq):
        """Queries and the cacheable latents for x [B, T, D] at positions [B, T].

        Returns q_nope [B,T,N,Hn], q_rope [B,T,N,Hr] (both scaled by alpha_q, q_rope rotated), c_q [B,T,Rq]
        (the unscaled query latent, the indexer's input), c_kv [B,T,R] (normed, scaled by alpha_kv) and
        k_rope [B,T,Hr] (rotated, unscaled).
        """
        cfg, dt = self.cfg, x.dtype
        c_q = rms_norm(matmul(x, self.w_q_down[...]), self.q_norm[...], cfg.mla_norm_eps)
        q = matmul(c_q, self.w_q_up[...]) * jnp.asarray(cfg.q_scale, dt)
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        kv = matmul(x, self.w_kv_down[...])
        c_kv = rms_norm(kv[..., : cfg.kv_lora_rank], self.kv_norm[...], cfg.mla_norm_eps)
        c_kv = c_kv * jnp.asarray(cfg.kv_scale, dt)
        k_rope = apply_rope(kv[..., cfg.kv_lora_rank :], positions, inv_freq, interleaved=True)
        q_rope = apply_rope(q_rope, positions, inv_freq, interleaved=True)
        return q_nope, q_rope, c_q, c_kv, k_rope

    def attend(self, q_nope, q_rope, c_kv, k_rope, mask, absorbed: bool = False):
        """Attention over latent keys c_kv [B,S,R], k_rope [B,S,Hr] with a boolean mask [B,T,S].

        Returns (out [B,T,D], probs [B,T,S] f32: the attention distribution averaged over heads, the target of
        the indexer's KL loss; XLA drops it when unused).
        """
        if absorbed:
            o, probs = attend_absorbed(q_nope, q_rope, c_kv, k_rope, self.w_kv_up[...], mask, self.cfg,
                                       split=self.absorbed_weights())
        else:
            o, probs = attend_naive(q_nope, q_rope, c_kv, k_rope, self.w_kv_up[...], mask, self.cfg)
        return self.project_out(o), probs

    def project_out(self, o):
        """W_O: per-head values o [B,T,N,Hv] -> [B,T,D].

        One [N*Hv] x [N*Hv, D] contraction: as an einsum over (n, h), XLA:CPU may instead copy w_o into the
        layout of o's heads (a decode step's largest copy). B and T stay apart: under context parallelism T is
        split and B is not, and merging them would make XLA gather the whole activation."""
        B, T, N, H = o.shape
        w = self.w_o[...]
        return matmul(o.reshape(B, T, N * H), w.reshape(N * H, w.shape[-1]))

    def absorbed_weights(self):
        """(W_UK [N,Hn,R], W_UV [N,R,Hv]): the split held by a served model, else split from w_kv_up."""
        if hasattr(self, "w_uk"):
            return self.w_uk[...], self.w_uv[...]
        return split_absorbed(self.w_kv_up[...], self.cfg)

    def absorb_query(self, q_nope):
        """q~ = W_UK^T q_nope [B,T,N,R] (`absorb_query`)."""
        return absorb_query(q_nope, self.absorbed_weights()[0])

    def latent_output(self, o_lat):
        """The output [B,T,D] from absorbed attention's latent sums o_lat [B,T,N,R]: W_UV, then W_O."""
        return self.project_out(latent_values(o_lat, self.absorbed_weights()[1]))


def attend_naive(q_nope, q_rope, c_kv, k_rope, w_kv_up, mask, cfg: Config):
    """Per-head keys/values from the latent: o [B,T,N,Hv] = softmax(q.k * s) v; also the head-mean probs."""
    dt = q_nope.dtype
    kv = jnp.einsum("bsr,rnh->bsnh", c_kv, w_kv_up.astype(dt))
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]
    scores = jnp.einsum("btnh,bsnh->bnts", q_nope, k_nope) + rope_scores(q_rope, k_rope)
    p = softmax_f32(scores * cfg.softmax_scale, mask[:, None])
    return jnp.einsum("bnts,bsnh->btnh", p.astype(dt), v), p.mean(axis=1)


def split_absorbed(w_kv_up, cfg: Config):
    """w_kv_up [..., R, N, Hn + Hv] -> (W_UK [..., N, Hn, R], W_UV [..., N, R, Hv]), head-major."""
    w_uk = jnp.einsum("...rnh->...nhr", w_kv_up[..., : cfg.qk_nope_head_dim])
    w_uv = jnp.einsum("...rnh->...nrh", w_kv_up[..., cfg.qk_nope_head_dim :])
    return w_uk, w_uv


def add_absorbed_weights(attn: MLA) -> None:
    """Hold W_UK and W_UV split once (`Absorbed` variables; stacked layers get them stacked too)."""
    w_uk, w_uv = split_absorbed(attn.w_kv_up[...], attn.cfg)
    attn.w_uk, attn.w_uv = Absorbed(w_uk), Absorbed(w_uv)


def absorb_query(q_nope, w_uk):
    """q~ = W_UK^T q_nope [B,T,N,R] from W_UK [N,Hn,R]: the no-position query part, scored against the latent
    c_kv directly."""
    return heads_matmul(q_nope, w_uk)


def absorbed_scores(q_lat, q_rope, c_kv, k_rope):
    """Unscaled absorbed-form scores [B,N,T,S]: q~ . c_kv + q_rope . k_rope, in the inputs' dtype, as one
    matmul over the latent and rope parts side by side: two matmuls leave XLA:CPU one score tensor to
    transpose before the sum (a served 128-token prefill is 5-9% faster this way)."""
    q = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1).transpose(0, 2, 1, 3)  # [B,N,T,R+Hr]
    k = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)  # [B,S,R+Hr]
    return jnp.einsum("bntx,bsx->bnts", q, k)


def rope_scores(q_rope, k_rope):
    """q_rope [B,T,N,Hr] . k_rope [B,S,Hr] -> [B,N,T,S]. The heads go first on the small operand: a matmul
    with only B as its batch dimension writes [B,T,N,S], and XLA:CPU then transposes the whole score tensor
    (forward and backward)."""
    return jnp.einsum("bnth,bsh->bnts", q_rope.transpose(0, 2, 1, 3), k_rope)


def attend_absorbed(q_nope, q_rope, c_kv, k_rope, w_kv_up, mask, cfg: Config, split=None):
    """Absorbed form: q~ = W_UK^T q_nope scores against c_kv directly; W_UV maps the latent sum to values.
    split: (W_UK, W_UV) as `split_absorbed` gives them, where held already (a served model's prefill)."""
    w_uk, w_uv = split_absorbed(w_kv_up, cfg) if split is None else split
    q_lat = absorb_query(q_nope, w_uk)
    p = softmax_f32(absorbed_scores(q_lat, q_rope, c_kv, k_rope) * cfg.softmax_scale, mask[:, None])
    o_lat = jnp.einsum("bnts,bsr->btnr", p.astype(q_nope.dtype), c_kv)
    return latent_values(o_lat, w_uv), p.mean(axis=1)


def latent_values(o_lat, w_uv):
    """W_UV: per-head values [B,T,N,Hv] from the latent sums o_lat [B,T,N,R] of absorbed attention."""
    return heads_matmul(o_lat, w_uv)


def attend_paged_decode(q_lat, q_rope, pages, page_table, positions, new_rows, scale: float):
    """Absorbed attention of one new token per sequence over all its rows, read through its page table (the
    dense model's decode step; `pallas_kernels.sparse_mla_decode` reads only selected rows).

    q_lat [B,N,R], q_rope [B,N,Hr]; pages [P, page, R + Hr] (c_kv | k_rope rows); page_table [B, W];
    positions [B]: the new token's position, whose own row new_rows [B, R + Hr] is not in the pages yet.
    Returns o_lat [B,N,R] f32. Scores and values read the rows as they are gathered, c_kv and k_rope together
    (one matmul each, no slicing copies); the new row is put in place by a select that XLA fuses into the
    gather. A row whose position is 0 attends to its own row only.

    Scores and probabilities stay [B,S,N] (rows . q: the S rows on the matmul's long side): XLA:CPU runs the
    [B,N,S] form's batched matmul, whose long operand is contracted on its minor axis, at about a third of the
    speed, and it folds a transpose of the scores back into that form (decode step of 32 rows over 512
    positions on the serving benchmark's model: 1.23x faster in all; 8 rows over 256 positions, 1.1x).
    """
    B, W = page_table.shape
    S, R = W * pages.shape[1], q_lat.shape[-1]
    q = jnp.concatenate([q_lat, q_rope], axis=-1).astype(pages.dtype)  # [B, N, R + Hr]
    new_rows = new_rows.astype(pages.dtype)
    if cpu_serving.paged_attention_applies(q, pages, page_table):  # the CPU serving step: one custom call
        o = cpu_serving.paged_decode_attention(q, pages, page_table, positions, new_rows, scale)
        return jax.lax.slice_in_dim(o, 0, R, axis=2)
    rows = pages[page_table].reshape(B, S, pages.shape[2])  # [B, S, R + Hr]
    pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    rows = jnp.where((pos == positions[:, None])[..., None], new_rows[:, None], rows)
    s = jnp.einsum("bsx,bnx->bsn", rows, q, preferred_element_type=jnp.float32) * scale
    # Never a fully masked row (position 0 is always valid), so the plain softmax: `softmax_f32`'s guards
    # against one cost this step 3-4% (they keep XLA from fusing the reductions over the middle axis).
    p = jax.nn.softmax(jnp.where((pos <= positions[:, None])[:, :, None], s, -jnp.inf), axis=1)
    # Values over the whole row: 25% more of a small matmul, cheaper than copying c_kv out of every row
    o = jnp.einsum("bsn,bsx->bnx", p.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    return jax.lax.slice_in_dim(o, 0, R, axis=2)
