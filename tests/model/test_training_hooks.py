"""The model's training hooks: packed documents, the indexer KL loss, expert statistics, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longcat_jax as lj
from longcat_jax.model.indexer_loss import attention_recall, indexer_kl, selection_recall
from longcat_jax.ops.masks import attention_mask, indices_to_mask
from tests.helpers import rel_err

FORWARD = jax.jit(lj.forward, static_argnames=("with_mtp", "collect_aux", "dense_attention", "measure_recall",
                                               "remat"))


@pytest.fixture(scope="module")
def tiny():
    cfg = lj.Config.tiny(hi_enabled=False)
    return cfg, lj.build_model(cfg, seed=0)


def _doc(cfg, n, seed):
    ids = np.random.RandomState(seed).randint(3, cfg.vocab_size, n)
    ids[-1] = cfg.eos_token_id
    return ids


def test_packed_documents_equal_separate_forwards(tiny):
    """Two documents packed in one row give each document's own logits (attention, SI sinks and window,
    N-gram history and MoE all stay inside the document)."""
    cfg, model = tiny
    a, b = _doc(cfg, 21, 0), _doc(cfg, 27, 1)  # both longer than index_topk = 16: selection is active
    row = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray(np.r_[np.ones(21), 2 * np.ones(27)].astype(np.int32)[None])
    pos = jnp.asarray(np.r_[np.arange(21), np.arange(27)].astype(np.int32)[None])
    packed = FORWARD(model, row, pos, segment_ids=seg)
    alone_a = FORWARD(model, jnp.asarray(a[None]))
    alone_b = FORWARD(model, jnp.asarray(b[None]))
    assert rel_err(packed.logits[:, :21], alone_a.logits) < 1e-5
    assert rel_err(packed.logits[:, 21:], alone_b.logits) < 1e-5
    assert rel_err(packed.mtp_logits[:, :, 21:-3], alone_b.mtp_logits[:, :, :-3]) < 1e-5


def test_aux_statistics(tiny):
    cfg, model = tiny
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 40)))
    out = FORWARD(model, tokens, collect_aux=True, measure_recall=True)
    aux = out.aux
    assert aux["expert_load"].shape == (cfg.num_layers, cfg.num_slots)
    np.testing.assert_array_equal(aux["expert_load"].sum(-1), 2 * 40 * cfg.moe_topk)
    assert (float(aux["indexer_kl"]) > 0 and float(aux["mtp_indexer_kl"]) > 0
            and float(aux["balance_loss"]) > 0)
    # 40 keys, top-16 selection: the sparse stage keeps much, not all, of the dense attention mass.
    assert 0.5 < float(aux["indexer_recall"]) < 1.0 and 0.5 < float(aux["mtp_indexer_recall"]) < 1.0
    dense = FORWARD(model, tokens, collect_aux=True, dense_attention=True)
    assert not np.allclose(dense.logits, out.logits)  # warm-up attends to every key
    assert 0.5 < float(dense.aux["indexer_recall"]) < 1.0
    np.testing.assert_allclose(FORWARD(model, tokens).logits, out.logits, atol=1e-6)


def test_padding_is_routed_to_zero_experts(tiny):
    cfg, model = tiny
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (1, 12)))
    seg = jnp.asarray([[1] * 8 + [0] * 4], jnp.int32)
    out = FORWARD(model, tokens, segment_ids=seg, collect_aux=True)
    np.testing.assert_array_equal(out.aux["expert_load"].sum(-1), 8 * cfg.moe_topk)


def test_indexer_learns_only_from_its_loss(tiny):
    cfg, model = tiny
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 32)))
    graphdef, params = nnx.split(model)

    def losses(params):
        out = FORWARD(nnx.merge(graphdef, params), tokens, collect_aux=True)
        return out.logits.mean() + out.mtp_logits.mean(), out.aux["indexer_kl"] + out.aux["mtp_indexer_kl"]

    g_main = jax.grad(lambda p: losses(p)[0])(params)
    g_kl = jax.grad(lambda p: losses(p)[1])(params)
    for path, v in nnx.to_flat_state(g_main):
        if "indexer" in path:
            assert not np.any(np.asarray(v.get_value())), path
    touched = {".".join(map(str, p)) for p, v in nnx.to_flat_state(g_kl) if np.any(np.asarray(v.get_value()))}
    assert touched and all("indexer" in p for p in touched), sorted(touched)


def test_indexer_kl_reference():
    rng = np.random.RandomState(5)
    scores = rng.randn(1, 3, 4).astype(np.float32)
    target = rng.rand(1, 3, 4).astype(np.float32)
    allowed = np.array([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 1]]], bool)
    want = []
    for t in range(3):
        m = allowed[0, t]
        p = target[0, t][m] / target[0, t][m].sum()
        q = np.exp(scores[0, t][m]) / np.exp(scores[0, t][m]).sum()
        want.append(np.sum(p * np.log(p / q)))
    got = indexer_kl(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(allowed))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    g = jax.grad(lambda s: indexer_kl(s, jnp.asarray(target), jnp.asarray(allowed)))(jnp.asarray(scores))
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[~allowed].any()


def test_remat_policy_gives_same_gradients(tiny):
    cfg, model = tiny
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, cfg.vocab_size, (1, 24)))
    graphdef, params = nnx.split(model)

    def loss(params, remat):
        return FORWARD(nnx.merge(graphdef, params), tokens, remat=remat).logits.std()

    plain = jax.grad(loss)(params, None)
    saved = jax.grad(loss)(params, jax.checkpoint_policies.save_only_these_names("attn_out", "moe_out"))
    for (p, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(saved)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=2e-4, atol=1e-6,
                                   err_msg=str(p))


@pytest.mark.parametrize("packed", [False, True])
def test_selection_recall_equals_dense_recall(packed):
    """The blockwise recall (queries in blocks of 8, T = 21 not a multiple) equals the share of the dense
    head-mean attention on the selected keys, with -1 slots, unwritten keys and packed documents."""
    B, T, N, R, Hr, K = 2, 21, 3, 8, 4, 5
    keys = jax.random.split(jax.random.key(5), 5)
    q_lat, q_rope = jax.random.normal(keys[0], (B, T, N, R)), jax.random.normal(keys[1], (B, T, N, Hr))
    c_kv, k_rope = jax.random.normal(keys[2], (B, T, R)), jax.random.normal(keys[3], (B, T, Hr))
    indices = jax.random.randint(keys[4], (B, T, K), -1, T)
    k_valid = jnp.arange(T)[None, :] < jnp.array([[T], [17]])  # row 1: the last 4 keys are unwritten
    seg = jnp.where(jnp.arange(T)[None, :] < jnp.array([[T], [9]]), 1, 2) if packed else None
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    if packed:
        pos = jnp.where(seg == 2, pos - 9, pos)
    query_mask = jnp.ones((B, T)).at[0, 3].set(0.0)

    scores = (jnp.einsum("btnr,bsr->bnts", q_lat, c_kv) + jnp.einsum("btnh,bsh->bnts", q_rope, k_rope)) * 0.3
    valid = k_valid[:, None, :] if seg is None else k_valid[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    allowed = attention_mask(pos, pos, valid)
    probs = jax.nn.softmax(jnp.where(allowed[:, None], scores, -jnp.inf), axis=-1).mean(1)
    want = attention_recall(probs, indices_to_mask(indices, T) & allowed, query_mask)
    got = selection_recall(q_lat, q_rope, c_kv, k_rope, indices, 0.3, pos, pos, k_valid=k_valid,
                           segment_ids=seg, query_mask=query_mask, block_q=8)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert 0.1 < float(want) < 0.9
