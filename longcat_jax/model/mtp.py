"""Multi-token prediction: one dense block applied mtp_num_steps times with shared weights
(docs/architecture.md#mtp).

Step k = 1..S drafts token t+k+1 at position t:
    e   = Emb_mtp(x_{t+k})
    u   = eh_proj([enorm(e); hnorm(h^{k-1})])      # embedding first, then hidden
    h^k = DenseLayer(u)                             # MLA (+ its own indexer) and a dense SwiGLU
    logits_k = lm_head(norm(h^k))                   # the trunk's LM head
The indexer runs at step 1 and steps 2..S reuse its indices (`dsa_mtp_cli`). No N-gram embedding here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.block import Context, attention_sublayer, indexer_aux
from longcat_jax.model.indexer import Indexer
from longcat_jax.model.layers import MLP, RMSNorm, param
from longcat_jax.model.mla import MLA


class MTP(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        D, eps, pd = cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype
        self.embed = param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), pd)
        self.enorm, self.hnorm = RMSNorm(D, eps, cfg), RMSNorm(D, eps, cfg)
        # Input axis is the concatenation [e; h] (2D wide); left unsharded so `embed` is used once.
        self.w_eh = param(rngs, (2 * D, D), (None, "embed"), pd)
        self.norm_in, self.norm_post = RMSNorm(D, eps, cfg), RMSNorm(D, eps, cfg)
        self.attn = MLA(cfg, rngs)
        self.indexer = Indexer(cfg, rngs) if cfg.use_indexer else None
        self.mlp = MLP(cfg, cfg.ffn_hidden_size, rngs)
        self.final_norm = RMSNorm(D, eps, cfg)
        self.cfg = cfg

    def step(self, h_prev, next_tokens, ctx: Context, indices=None):
        """One draft step: h_prev [B,T,D], next_tokens [B,T] -> (h [B,T,D], indices, attention aux)."""
        dt = h_prev.dtype
        e = self.embed[...].astype(dt)[next_tokens]
        u = jnp.concatenate([self.enorm(e), self.hnorm(h_prev)], axis=-1)
        u = jnp.einsum("btc,cd->btd", u, self.w_eh[...].astype(dt))
        indexer = self.indexer if indices is None else None
        out, _, indices, aux = attention_sublayer(self.attn, indexer, self.norm_in(u), ctx, self.cfg, None,
                                                  indices)
        h = u + out
        h = h + self.mlp(self.norm_post(h))
        return h, indices, aux

    def __call__(self, h0, tokens, ctx: Context, lm_head):
        """Teacher-forced drafts for every position.

        h0 [B,T,D]: the trunk hidden state (pre- or post-final-norm per cfg.mtp_hidden_source); tokens [B,T];
        lm_head [D,V]. Returns (logits [S,B,T,V], aux); step k at position t predicts token t+k+1, so the last
        k+1 positions of step k have no target (the loss masks them). With ctx.collect_aux, aux holds the MTP
        indexer's KL against the attention of all steps (they share its indices), and its selection recall in
        the dense warm-up or with ctx.measure_recall.
        """
        h, indices, logits, steps = h0, None, [], []
        seg = ctx.segment_ids
        for k in range(1, self.cfg.mtp_num_steps + 1):
            shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # x_{t+k}; zeros past the end
            if seg is not None:
                # Zeros past the end of t's document too: no token of the next document or of the padding
                # reaches t (its draft target is masked, but the MTP indexer's KL counts every real query).
                shifted = jnp.where(jnp.pad(seg[:, k:], ((0, 0), (0, k))) == seg, shifted, 0)
            with jax.named_scope(f"mtp_step{k}"):
                h, indices, aux = self.step(h, shifted, ctx, indices)
            steps.append(aux)
            logits.append(jnp.einsum("btd,dv->btv", self.final_norm(h), lm_head.astype(h.dtype)))
        aux = {}
        if ctx.collect_aux and self.indexer is not None:
            aux = indexer_aux(steps[0], steps, ctx, self.cfg)
        return jnp.stack(logits), aux
