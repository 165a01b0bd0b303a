"""The blockwise dense warm-up (longcat_jax.model.dense_warmup) equals the quadratic reference, in values and
gradients, and never forms a [T, S] array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.model.dense_warmup import dense_attention, dense_indexer_stats
from longcat_jax.model.indexer_loss import attention_recall, indexer_kl
from longcat_jax.ops.indexer_scores import indexer_scores
from longcat_jax.ops.masks import attention_mask, indices_to_mask, softmax_f32
from tests.helpers import largest_intermediate, rel_err

B, T, N, R, HR, I, J, K = 2, 21, 3, 8, 4, 2, 6, 5  # T is not a multiple of the block of 8
SCALE = 0.3


def _case(packed: bool):
    keys = iter(jax.random.split(jax.random.key(3), 12))
    normal = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731
    sublayers = [(normal(B, T, N, R), normal(B, T, N, HR), normal(B, T, R), normal(B, T, HR))
                 for _ in range(2)]
    index_qkw = (normal(B, T, I, J), normal(B, T, J), normal(B, T, I))
    indices = jax.random.randint(next(keys), (B, T, K), -1, T)
    seg = jnp.where(jnp.arange(T)[None, :] < jnp.array([[T], [9]]), 1, 2) if packed else None
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    if packed:
        pos = jnp.where(seg == 2, pos - 9, pos)
    return sublayers, index_qkw, indices, pos, seg


def _allowed(pos, seg):
    return attention_mask(pos, pos, None if seg is None else seg[:, :, None] == seg[:, None, :])


def _reference_attention(q_lat, q_rope, c_kv, k_rope, pos, seg):
    scores = jnp.einsum("btnr,bsr->bnts", q_lat, c_kv) + jnp.einsum("btnh,bsh->bnts", q_rope, k_rope)
    p = softmax_f32(scores * SCALE, _allowed(pos, seg)[:, None])
    return jnp.einsum("bnts,bsr->btnr", p.astype(c_kv.dtype), c_kv), p.mean(1)


@pytest.mark.parametrize(("packed", "dtype"),
                         [(False, jnp.float32), (True, jnp.float32), (True, jnp.bfloat16)])
def test_dense_attention_equals_reference(packed, dtype):
    """Values and gradients; in bf16 both sides compute the scores in bf16 and normalise them in f32."""
    sublayers, _, _, pos, seg = _case(packed)
    latents = [a.astype(dtype) for a in sublayers[0]]
    d_out = jax.random.normal(jax.random.key(9), (B, T, N, R), dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2

    def loss(fn, *args):
        return jnp.sum(fn(*args) * d_out)

    got = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))(
        lambda *a: dense_attention(*a, SCALE, pos, seg, block_q=8), *latents)
    want = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))(
        lambda *a: _reference_attention(*a, pos, seg)[0], *latents)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=tol)
    for g, w in zip(got[1], want[1]):
        assert g.dtype == dtype and rel_err(g, w) < tol


@pytest.mark.parametrize("packed", [False, True])
def test_dense_indexer_stats_equal_reference(packed):
    """Two served sublayers (CLI): the KL against their mean attention and the mean of their recalls, with -1
    slots, packed documents and a masked query; the KL's gradients for the indexer's q, k and w."""
    sublayers, index_qkw, indices, pos, seg = _case(packed)
    query_mask = jnp.ones((B, T)).at[0, 3].set(0.0)
    allowed = _allowed(pos, seg)
    probs = [_reference_attention(*lat, pos, seg)[1] for lat in sublayers]
    selected = indices_to_mask(indices, T) & allowed

    def reference_kl(q, k, w):
        scores = indexer_scores(q, k, w, pos, pos, allowed)
        return indexer_kl(scores, sum(probs) / 2, allowed, query_mask)

    def blockwise_kl(q, k, w):
        return dense_indexer_stats((q, k, w), sublayers, indices, SCALE, pos, seg, query_mask, block_q=8)

    want_kl, want_grads = jax.value_and_grad(reference_kl, argnums=(0, 1, 2))(*index_qkw)
    got_kl, got_recall = blockwise_kl(*index_qkw)
    got_grads = jax.grad(lambda *a: blockwise_kl(*a)[0], argnums=(0, 1, 2))(*index_qkw)
    want_recall = sum(attention_recall(p, selected, query_mask) for p in probs) / 2
    np.testing.assert_allclose(float(got_kl), float(want_kl), rtol=1e-5)
    np.testing.assert_allclose(float(got_recall), float(want_recall), rtol=1e-5)
    assert float(want_kl) > 0 and 0.1 < float(want_recall) < 0.9
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-5


def test_no_quadratic_array():
    """With T = 96 and blocks of 8 queries, nothing the forward or backward forms is as large as [B, T, S]."""
    T_long = 96
    keys = jax.random.split(jax.random.key(4), 8)
    lat = (jax.random.normal(keys[0], (1, T_long, N, R)), jax.random.normal(keys[1], (1, T_long, N, HR)),
           jax.random.normal(keys[2], (1, T_long, R)), jax.random.normal(keys[3], (1, T_long, HR)))
    qkw = (jax.random.normal(keys[4], (1, T_long, I, J)), jax.random.normal(keys[5], (1, T_long, J)),
           jax.random.normal(keys[6], (1, T_long, I)))
    indices = jax.random.randint(keys[7], (1, T_long, K), -1, T_long)
    pos = jnp.arange(T_long)[None]
    bound = T_long * T_long

    def largest(fn, args):
        return largest_intermediate(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(*args).jaxpr)

    attention = lambda *a: dense_attention(*a, SCALE, pos, block_q=8).sum()  # noqa: E731
    stats = lambda *a: dense_indexer_stats(a, [lat], indices, SCALE, pos, block_q=8)[0]  # noqa: E731
    assert largest(lambda *a: _reference_attention(*a, pos, None)[0].sum(), lat) >= bound
    assert largest(attention, lat) < bound
    assert largest(stats, qkw) < bound
