"""Lightning indexer and LSA selection (docs/architecture.md#lsa).

Parity: transformers' DeepseekV32Indexer (half-split rope) and GlmMoeDsaIndexer (interleaved rope).
Both use a LayerNorm k_norm with bias where LongCat uses RMSNorm. Our scores are checked on HF's own q/k/w
with a general LayerNorm; the full project() path is checked with wk chosen so that wk x has zero mean over
its J outputs and a zero LayerNorm bias, which makes LayerNorm equal RMSNorm. HF's internal scores are
captured from its topk call.
Selection rules (dense / SI / HI / ties / mask) are checked against small numpy references.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model import indexer as ix
from longcat_jax.ops.masks import indices_to_mask

torch = pytest.importorskip("torch", reason="torch is needed for the HF parity tests")
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_ds  # noqa: E402
from transformers.models.deepseek_v32.configuration_deepseek_v32 import DeepseekV32Config  # noqa: E402
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf_glm  # noqa: E402
from transformers.models.glm_moe_dsa.configuration_glm_moe_dsa import GlmMoeDsaConfig  # noqa: E402

# 8 indexer heads make exact-zero score ties (all heads ReLU-clipped) rare; eps matches HF's LayerNorm.
PARITY_CFG = Config.tiny(index_n_heads=8, si_enabled=False, hi_enabled=False, index_k_norm_eps=1e-6)
HF = {  # kind -> (config class, indexer class, rotary class, the indexer's rope function, interleaved rope)
    "deepseek_v32": (DeepseekV32Config, hf_ds.DeepseekV32Indexer, hf_ds.DeepseekV32RotaryEmbedding,
                     hf_ds.apply_rotary_pos_emb, False),
    "glm_moe_dsa": (GlmMoeDsaConfig, hf_glm.GlmMoeDsaIndexer, hf_glm.GlmMoeDsaRotaryEmbedding,
                    hf_glm.apply_rotary_pos_emb_interleave, True),
}


def relnorm(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_indexer(cfg: Config, seed: int = 0) -> ix.Indexer:
    with nnx.use_eager_sharding(False):
        return ix.Indexer(cfg, nnx.Rngs(seed))


# --- HF reference -------------------------------------------------------------------------------------------


def hf_indexer_run(kind: str, cfg: Config, seed: int, T: int, offsets, rms_like: bool):
    """Random HF indexer and inputs: HF's scores and indices, HF q/k/w (w in our convention), HF weights."""
    conf_cls, ind_cls, rot_cls, rope_fn, _ = HF[kind]
    hc = conf_cls(
        hidden_size=cfg.hidden_size, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        max_position_embeddings=cfg.max_position_embeddings,
        # mscale == mscale_all_dim keeps HF's cos/sin amplitude at 1, as in docs/architecture.md#rope.
        rope_parameters=dict(
            rope_type="yarn", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
            original_max_position_embeddings=cfg.rope_original_max_position, beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow, mscale=1.0, mscale_all_dim=1.0),
    )
    torch.manual_seed(seed)
    ind, rot = ind_cls(hc, 0).float().eval(), rot_cls(hc)
    I, J, r = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    with torch.no_grad():
        for lin in (ind.wq_b, ind.wk, ind.weights_proj):
            lin.weight.normal_(0.0, 0.2)
        ind.k_norm.weight.uniform_(0.5, 1.5)
        if rms_like:
            # Zero-mean wk output and zero bias: LayerNorm(y) == RMSNorm(y) with the same eps.
            ind.wk.weight -= ind.wk.weight.mean(dim=0, keepdim=True)
            ind.k_norm.bias.zero_()
        else:
            ind.k_norm.bias.normal_(0.0, 0.5)
    B = len(offsets)
    h = torch.randn(B, T, cfg.hidden_size)
    c_q = torch.randn(B, T, cfg.q_lora_rank)
    pos = torch.tensor(offsets)[:, None] + torch.arange(T)[None]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None].expand(B, T, T)
    cos, sin = rot(h, pos)

    captured = []
    orig_topk = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        captured.append(self.detach().clone())
        return orig_topk(self, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(torch.Tensor, "topk", spy):
        hf_idx = ind(h, c_q, (cos, sin), causal, pos)
    assert len(captured) == 1
    with torch.no_grad():  # HF's q/k/w from its own submodules and rope function, in HF's call order
        q = ind.wq_b(c_q).view(B, T, I, J)
        k = ind.k_norm(ind.wk(h)).unsqueeze(2)
        q_rot, k_rot = rope_fn(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., r:]], dim=-1)
        k = torch.cat([k_rot, k[..., r:]], dim=-1).squeeze(2)
        w = ind.weights_proj(h) * (I**-0.5 * J**-0.5)
    n = lambda t: t.detach().numpy()  # noqa: E731
    return dict(
        h=n(h), c_q=n(c_q), pos=n(pos).astype(np.int32), scores=n(captured[0]), idx=n(hf_idx),
        q=n(q), k=n(k), w=n(w), wq_b=n(ind.wq_b.weight), wk=n(ind.wk.weight), k_norm=n(ind.k_norm.weight),
        weights_proj=n(ind.weights_proj.weight),
    )


def assert_same_selection(ours, theirs, scores, q_pos, k_pos):
    """Equal top-k up to ties: per row the same number of valid picks with the same score multiset, and equal
    sets wherever the K-th and (K+1)-th best scores differ (index order inside a set does not matter)."""
    clear = 0
    for b in range(ours.shape[0]):
        for t in range(ours.shape[1]):
            row = scores[b, t]
            o = ours[b, t][ours[b, t] >= 0]
            h = theirs[b, t][k_pos[b, theirs[b, t]] <= q_pos[b, t]]  # HF fills short rows with future keys
            assert len(o) == len(set(o.tolist())) == len(h), (b, t)
            np.testing.assert_allclose(np.sort(row[o]), np.sort(row[h]), rtol=1e-5, atol=1e-6)
            srt = np.sort(row[np.isfinite(row)])[::-1]
            if len(srt) > len(o) and srt[len(o) - 1] - srt[len(o)] > 1e-4 * np.abs(srt).max():
                assert set(o.tolist()) == set(h.tolist()), (b, t)
                clear += 1
    assert clear > 0  # the exact-set branch ran


# --- Parity with HF -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HF))
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_hf_on_hf_projections(kind, seed):
    """Our indexer_scores on HF's own q/k/w (LayerNorm k_norm with bias) equals HF's scores and top-k sets."""
    cfg = PARITY_CFG
    ref = hf_indexer_run(kind, cfg, seed, T=32, offsets=[0, 37], rms_like=False)
    scores = np.asarray(ix.indexer_scores(ref["q"], ref["k"], ref["w"], ref["pos"], ref["pos"]))
    assert np.array_equal(np.isinf(scores), np.isinf(ref["scores"]))
    fin = np.isfinite(scores)
    assert relnorm(scores[fin], ref["scores"][fin]) < 1e-5
    idx = np.asarray(ix.select(ref["q"], ref["k"], ref["w"], ref["pos"], ref["pos"], cfg))
    assert_same_selection(idx, ref["idx"], ref["scores"], ref["pos"], ref["pos"])


@pytest.mark.parametrize("kind", list(HF))
def test_project_matches_hf(kind):
    """Full path: Indexer.project with HF's weights (transposed to [in, out]) gives HF's q, k, w, scores."""
    _, _, _, _, interleave = HF[kind]
    cfg = PARITY_CFG.replace(indexer_rope_interleave=interleave)
    ref = hf_indexer_run(kind, cfg, seed=3, T=32, offsets=[5, 40], rms_like=True)
    I, J, R = cfg.index_n_heads, cfg.index_head_dim, cfg.q_lora_rank
    m = make_indexer(cfg)
    m.wq_b[...] = jnp.asarray(ref["wq_b"].T.reshape(R, I, J))
    m.wk[...] = jnp.asarray(ref["wk"].T)
    m.k_norm[...] = jnp.asarray(ref["k_norm"])
    m.weights_proj[...] = jnp.asarray(ref["weights_proj"].T)
    q, k, w = m.project(jnp.asarray(ref["h"]), jnp.asarray(ref["c_q"]), jnp.asarray(ref["pos"]))
    assert q.dtype == k.dtype == w.dtype == jnp.float32
    for ours, theirs in ((q, ref["q"]), (k, ref["k"]), (w, ref["w"])):
        assert ours.shape == theirs.shape and relnorm(ours, theirs) < 1e-5
    scores = np.asarray(ix.indexer_scores(q, k, w, ref["pos"], ref["pos"]))
    fin = np.isfinite(ref["scores"])
    assert np.array_equal(np.isfinite(scores), fin) and relnorm(scores[fin], ref["scores"][fin]) < 1e-5
    idx = np.asarray(ix.select(q, k, w, ref["pos"], ref["pos"], cfg))
    assert_same_selection(idx, ref["idx"], ref["scores"], ref["pos"], ref["pos"])


def test_rope_layout_matters():
    """Guard against a vacuous parity test: the wrong rope layout gives different keys."""
    ref = hf_indexer_run("deepseek_v32", PARITY_CFG, seed=3, T=8, offsets=[40], rms_like=True)
    m = make_indexer(PARITY_CFG.replace(indexer_rope_interleave=True))
    m.wk[...] = jnp.asarray(ref["wk"].T)
    m.k_norm[...] = jnp.asarray(ref["k_norm"])
    _, k, _ = m.project(jnp.asarray(ref["h"]), jnp.asarray(ref["c_q"]), jnp.asarray(ref["pos"]))
    assert relnorm(k, ref["k"]) > 1e-2


# --- Module -------------------------------------------------------------------------------------------------


def test_indexer_params():
    cfg = Config.tiny(param_dtype="bfloat16")
    m = make_indexer(cfg)
    I, J, D, R = cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size, cfg.q_lora_rank
    want = {
        "wq_b": ((R, I, J), ("q_lora", "indexer_heads", "head_dim"), jnp.bfloat16),
        "wk": ((D, J), ("embed", "head_dim"), jnp.bfloat16),
        "k_norm": ((J,), ("head_dim",), jnp.bfloat16),
        "weights_proj": ((D, I), ("embed", "indexer_heads"), jnp.float32),  # fp32 whatever the param dtype
    }
    assert set(nnx.state(m, nnx.Param).keys()) == set(want)
    for name, (shape, names, dtype) in want.items():
        p = getattr(m, name)
        assert p[...].shape == shape and p[...].dtype == dtype and p.get_metadata()["out_sharding"] == names
    T = 5
    x, c_q = jnp.ones((2, T, D), jnp.float32), jnp.ones((2, T, R), jnp.float32)
    q, k, w = m.project(x, c_q, jnp.broadcast_to(jnp.arange(T), (2, T)))
    assert (q.shape, k.shape, w.shape) == ((2, T, I, J), (2, T, J), (2, T, I))
    assert q.dtype == k.dtype == w.dtype == jnp.float32


# --- Selection rules ----------------------------------------------------------------------------------------


def rand_qkw(cfg: Config, B: int, T: int, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (B, T, cfg.index_n_heads, cfg.index_head_dim))
    k = jax.random.normal(k2, (B, T, cfg.index_head_dim))
    w = jax.random.normal(k3, (B, T, cfg.index_n_heads))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return q, k, w, pos


def np_topk(row, K):
    """Reference top-K of one row: descending score, lowest index first on ties, -1 for -inf."""
    order = np.argsort(-row, kind="stable")[:K]
    out = np.full(K, -1)
    keep = row[order] > -np.inf
    out[: keep.sum()] = order[keep]
    return out


def test_dense_when_few_keys():
    """Causal length t+1 <= K: exactly all causal keys, SI on or off, the rest -1
    (docs/architecture.md#si)."""
    for si in (True, False):
        cfg = Config.tiny(si_enabled=si, hi_enabled=False)
        K = cfg.index_topk
        q, k, w, pos = rand_qkw(cfg, 2, K + 4)
        idx = np.asarray(ix.select(q, k, w, pos, pos, cfg))
        assert idx.shape == (2, K + 4, K) and idx.dtype == np.int32
        for t in range(K):
            assert sorted(idx[0, t][idx[0, t] >= 0].tolist()) == list(range(t + 1))
            assert (idx[1, t] == -1).sum() == K - t - 1
        assert (idx[:, K:] >= 0).all()


def test_si_forced_set_and_budget():
    cfg = Config.tiny(hi_enabled=False)
    K, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    T = 3 * K
    q, k, w, pos = rand_qkw(cfg, 2, T, seed=1)
    scores = np.asarray(ix.indexer_scores(q, k, w, pos, pos))
    idx = np.asarray(ix.select(q, k, w, pos, pos, cfg))
    for b in range(2):
        for t in range(K, T):
            sel = idx[b, t].tolist()
            assert len(set(sel)) == K and min(sel) >= 0 and max(sel) <= t
            forced = set(range(init)) | set(range(t - local + 1, t + 1))
            assert forced <= set(sel)
            # The dynamic slots are the best non-forced keys.
            row = scores[b, t].copy()
            row[list(forced)] = -np.inf
            dyn = np_topk(row, K - len(forced))
            assert set(sel) - forced == set(dyn.tolist())


def test_si_off_is_plain_topk():
    cfg = Config.tiny(si_enabled=False, hi_enabled=False)
    T = 2 * cfg.index_topk + 3
    q, k, w, pos = rand_qkw(cfg, 2, T, seed=2)
    scores = np.asarray(ix.indexer_scores(q, k, w, pos, pos))
    idx = np.asarray(ix.select(q, k, w, pos, pos, cfg))
    ref = np.stack([np.stack([np_topk(scores[b, t], cfg.index_topk) for t in range(T)]) for b in range(2)])
    np.testing.assert_array_equal(idx, ref)


def test_ties_are_deterministic():
    """Equal scores: the lowest key index wins, identically under jit (docs/architecture.md#determinism)."""
    T = 40
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))
    scores = jnp.zeros((1, T, T))
    for si in (False, True):
        cfg = Config.tiny(si_enabled=si, hi_enabled=False)
        K, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
        idx = np.asarray(ix.select_topk(scores, pos, pos, cfg))
        jit_idx = np.asarray(jax.jit(ix.select_topk, static_argnames="cfg")(scores, pos, pos, cfg=cfg))
        np.testing.assert_array_equal(idx, jit_idx)
        t = T - 1
        forced = set(range(init)) | set(range(t - local + 1, t + 1)) if si else set()
        rest = [s for s in range(T) if s not in forced][: K - len(forced)]
        assert set(idx[0, t].tolist()) == forced | set(rest)


def test_k_valid_and_cache_decode_matches_prefill():
    """A decode row over a padded key cache (k_valid) selects what the prefill row selects."""
    cfg = Config.tiny(hi_enabled=False)
    T, S = 30, 48
    q, k, w, pos = rand_qkw(cfg, 1, T, seed=4)
    full = np.asarray(ix.select(q, k, w, pos, pos, cfg))
    k_cache = jnp.concatenate([k, 100.0 * jnp.ones((1, S - T, k.shape[-1]))], axis=1)  # junk after the end
    k_pos = jnp.arange(S, dtype=jnp.int32)[None]
    k_valid = k_pos < T
    q_pos = jnp.full((1, 1), T - 1, jnp.int32)  # positions beyond T are future anyway; k_valid must also hold
    dec = np.asarray(ix.select(q[:, -1:], k_cache, w[:, -1:], q_pos, k_pos, cfg, k_valid))
    assert set(dec[0, 0].tolist()) == set(full[0, -1].tolist())
    bad_valid = jnp.zeros((1, S), bool).at[0, 3].set(True)
    few = np.asarray(ix.select(q[:, -1:], k_cache, w[:, -1:], q_pos, k_pos, cfg, bad_valid))
    assert few[0, 0, 0] == 3 and (few[0, 0, 1:] == -1).all()


def test_indices_to_mask():
    idx = jnp.array([[[2, 0, -1], [-1, -1, -1]], [[4, 1, 3], [3, -1, 3]]], jnp.int32)
    mask = np.asarray(indices_to_mask(idx, 5))
    want = np.zeros((2, 2, 5), bool)
    want[0, 0, [0, 2]] = True
    want[1, 0, [1, 3, 4]] = True
    want[1, 1, 3] = True
    np.testing.assert_array_equal(mask, want)  # -1 never wraps onto the last key


# --- HI -----------------------------------------------------------------------------------------------------


def test_hi_with_all_blocks_equals_si():
    cfg = Config.tiny()  # hi_enabled, hi_min_len 24
    T = 64
    assert ix.use_hierarchical(cfg, T) and not ix.use_hierarchical(cfg, cfg.hi_min_len)
    q, k, w, pos = rand_qkw(cfg, 2, T, seed=5)
    si = np.asarray(ix.select(q, k, w, pos, pos, cfg.replace(hi_enabled=False)))
    all_blocks = np.asarray(ix.select(q, k, w, pos, pos, cfg.replace(hi_top_blocks=T // cfg.hi_block_size)))
    np.testing.assert_array_equal(all_blocks, si)
    hi = np.asarray(ix.select(q, k, w, pos, pos, cfg))
    assert not np.array_equal(hi, si)  # the default 3 blocks do restrict the choice


def test_hi_picks_from_top_blocks_only():
    """Non-forced picks are the best tokens inside the top hi_top_blocks blocks by mean-key score (numpy)."""
    cfg = Config.tiny()
    Bh, M, K, init, local = cfg.hi_block_size, cfg.hi_top_blocks, cfg.index_topk, cfg.index_init_tokens, \
        cfg.index_local_tokens
    T = 64
    q, k, w, pos = rand_qkw(cfg, 1, T, seed=6)
    idx = np.asarray(ix.select(q, k, w, pos, pos, cfg))
    scores = np.asarray(ix.indexer_scores(q, k, w, pos, pos))[0]
    qn, kn, wn = (np.asarray(a, np.float64) for a in (q[0], k[0], w[0]))
    k_bar = kn.reshape(T // Bh, Bh, -1).mean(axis=1)
    checked = 0
    for t in range(K, T):
        cand = [b for b in range(T // Bh) if b * Bh <= t - local and (b + 1) * Bh - 1 >= init]
        bs = np.array([(wn[t] * np.maximum(qn[t] @ k_bar[b], 0)).sum() for b in cand])
        top = {cand[i] for i in np.argsort(-bs, kind="stable")[:M]}
        forced = set(range(init)) | set(range(t - local + 1, t + 1))
        dyn = set(idx[0, t][idx[0, t] >= 0].tolist()) - forced
        assert forced <= set(idx[0, t].tolist())
        inside = np.full(T, -np.inf)
        for s in range(t + 1):
            if s not in forced and s // Bh in top:
                inside[s] = scores[t, s]
        want = np_topk(inside, K - len(forced))
        assert dyn == set(want[want >= 0].tolist())
        checked += len(dyn) > 0
    assert checked > 0


def test_hi_never_uses_future_keys():
    """Changing keys after position t0 leaves every row t <= t0 unchanged (no leak through block means)."""
    cfg = Config.tiny()
    T, t0 = 64, 41
    q, k, w, pos = rand_qkw(cfg, 1, T, seed=7)
    select = jax.jit(ix.select, static_argnames="cfg")  # also checks that the HI path traces
    base = np.asarray(select(q, k, w, pos, pos, cfg=cfg))
    k2 = k.at[:, t0 + 1 :].set(50.0 * jax.random.normal(jax.random.key(9), k[:, t0 + 1 :].shape))
    moved = np.asarray(select(q, k2, w, pos, pos, cfg=cfg))
    np.testing.assert_array_equal(base[:, : t0 + 1], moved[:, : t0 + 1])
    assert not np.array_equal(base[:, t0 + 1 :], moved[:, t0 + 1 :])
    assert all(int(base[0, t].max()) <= t for t in range(T))


def test_hi_without_si():
    """HI and SI switch independently: with SI off every complete past block competes, the query's own
    incomplete block competes token by token, and covering all blocks gives the plain DSA top-k."""
    cfg = Config.tiny(si_enabled=False)
    T = 64
    q, k, w, pos = rand_qkw(cfg, 2, T, seed=8)
    plain = np.asarray(ix.select(q, k, w, pos, pos, cfg.replace(hi_enabled=False)))
    all_blocks = np.asarray(ix.select(q, k, w, pos, pos, cfg.replace(hi_top_blocks=T // cfg.hi_block_size)))
    np.testing.assert_array_equal(all_blocks, plain)
    hi = np.asarray(ix.select(q, k, w, pos, pos, cfg))
    assert not np.array_equal(hi, plain)
    for t in range(cfg.index_topk, T):  # the current block's causal keys are always candidates
        current = set(range((t // cfg.hi_block_size) * cfg.hi_block_size, t + 1))
        assert hi[0, t].max() <= t
        assert len(current & set(hi[0, t].tolist())) > 0
