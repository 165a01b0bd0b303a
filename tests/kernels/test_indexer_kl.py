"""Sparse-stage indexer KL (pallas_kernels/indexer_kl.py) against the dense loss of indexer_loss.py.

The oracle is `indexer_kl(indexer_scores(...), target scattered to [B,T,S], indices_to_mask(indices) & causal,
query_mask)`. Both paths ("xla" chunked and checkpointed, "pallas" in interpret mode with its custom VJP) must
match it in value and in the gradients for q, k and w, with indices from the token top-k (SI on), from the
block selection, from a cache with offset query positions and ragged validity, and random rows with holes,
all-empty rows, zero-mass targets and a query mask; f32 tightly and bf16 inputs loosely. The target gets no
gradient, the pallas backward gives the same bits on every run, and no path builds a [B, T, S] tensor.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.config import Config
from longcat_jax.model import indexer as ix
from longcat_jax.model.indexer_loss import indexer_kl
from longcat_jax.ops.masks import attention_mask, indices_to_mask
from pallas_kernels.indexer_blocks import select_blocks_reference
from pallas_kernels.indexer_kl import sparse_indexer_kl
from tests.helpers import largest_intermediate

IMPLS = ["xla", "pallas"]
CFG = Config.tiny(index_n_heads=4)  # K = 16, sinks 2, local window 4, I = 4, J = 16


def slots(B, n):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))


def random_indices(rng, qp, kv, K):
    """Distinct valid keys per row in random slot order, with -1 holes and some all-empty rows."""
    B, T = qp.shape
    S = kv.shape[1]
    out = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            if rng.rand() < 0.15:
                continue  # an all-empty row
            valid = [s for s in range(S) if s <= qp[b, t] and kv[b, s]]
            pick = rng.permutation(valid)[: rng.randint(1, K + 1)]
            out[b, t, rng.choice(K, len(pick), replace=False)] = pick
    return jnp.asarray(out)


_token_select = jax.jit(ix.select, static_argnums=5)
_block_select = jax.jit(select_blocks_reference, static_argnums=5, static_argnames="block_size")


def make_case(name, dtype=jnp.float32, seed=0):
    """(q, k, w, q_positions, k_positions, k_valid or None, indices, target, query_mask or None)."""
    B, T, S, I, J, K = 2, 37, 37, CFG.index_n_heads, CFG.index_head_dim, CFG.index_topk
    offsets, n_valid, qmask = (0, 0), None, None
    if name == "cache":
        T, S, offsets, n_valid = 6, 90, (40, 75), (46, 81)
    elif name == "T_equals_K":
        T = S = K
    rng = np.random.RandomState(seed)
    kq, kk, kw = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, I, J), dtype)
    k = jax.random.normal(kk, (B, S, J), dtype)
    w = jax.random.normal(kw, (B, T, I), dtype)
    qp, kp = slots(B, T) + jnp.asarray(offsets, jnp.int32)[:, None], slots(B, S)
    kv = None if n_valid is None else kp < jnp.asarray(n_valid, jnp.int32)[:, None]
    if name == "blocks":
        idx = _block_select(q, k, w, qp, kp, CFG, block_size=4, k_valid=kv)
    elif name == "random_masked":
        idx = random_indices(rng, np.asarray(qp), np.ones((B, S), bool), K)
        qmask = jnp.asarray(rng.rand(B, T) < 0.7)
    else:
        idx = _token_select(q, k, w, qp, kp, CFG, kv)
    # Main-attention probabilities at the slots: some exact zeros, and one row with no mass at all.
    target = jnp.asarray(rng.rand(B, T, K) * (rng.rand(B, T, K) < 0.8), jnp.float32).at[0, T - 1].set(0.0)
    return q, k, w, qp, kp, kv, idx, target, qmask


CASES = ["token_topk", "blocks", "cache", "T_equals_K", "random_masked"]


def dense_kl(q, k, w, qp, kp, kv, idx, target, qmask):
    """The oracle: the dense loss over [B, T, S] with the selection as its mask."""
    B, T, K = idx.shape
    S = k.shape[1]
    safe = jnp.where(idx < 0, S, idx)
    rows = (jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], safe)
    dense_target = jnp.zeros((B, T, S)).at[rows].set(target, mode="drop")
    allowed = indices_to_mask(idx, S) & attention_mask(qp, kp, kv)
    return indexer_kl(ix.indexer_scores(q, k, w, qp, kp, kv), dense_target, allowed, qmask)


@jax.jit
def dense_loss_and_grads(q, k, w, qp, kp, kv, idx, target, qmask):
    return jax.value_and_grad(dense_kl, argnums=(0, 1, 2))(q, k, w, qp, kp, kv, idx, target, qmask)


@partial(jax.jit, static_argnames=("impl", "key_block"))
def sparse_loss_and_grads(q, k, w, idx, target, qmask, impl, key_block=16):
    fn = partial(sparse_indexer_kl, impl=impl, query_block=16, key_block=key_block)
    return jax.value_and_grad(fn, argnums=(0, 1, 2))(q, k, w, idx, target, qmask)


def assert_close(got, want, rtol, name):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), name
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def check(name, dtype, rtol_value, rtol_grad):
    q, k, w, qp, kp, kv, idx, target, qmask = make_case(name, dtype)
    want, want_grads = dense_loss_and_grads(q, k, w, qp, kp, kv, idx, target, qmask)
    assert float(want) > 0.1  # a loss that could be wrong
    for impl in IMPLS:
        got, grads = sparse_loss_and_grads(q, k, w, idx, target, qmask, impl)
        assert_close(got, want, rtol_value, f"{impl} value")
        for g, r, arg in zip(grads, want_grads, "qkw"):
            assert g.dtype == dtype and g.shape == r.shape
            assert_close(g, r, rtol_grad, f"{impl} d{arg}")


@pytest.mark.parametrize("name", CASES)
def test_matches_dense_f32(name):
    check(name, jnp.float32, 1e-5, 2e-5)


def test_matches_dense_bf16_inputs():
    """Math is f32 in every path; only the returned bf16 gradients are rounded."""
    check("random_masked", jnp.bfloat16, 1e-4, 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_key_gradient_sums_in_f32(impl):
    """Each of 8 keys fills 32 slots of each of 64 queries: dk for bf16 keys is summed in f32, then rounded
    once (the XLA path once summed the 2048 contributions in bf16 and lost ~6% of a key's gradient)."""
    B, T, S, K, I, J = 1, 64, 8, 256, CFG.index_n_heads, CFG.index_head_dim
    kq, kk, kw, kt = jax.random.split(jax.random.key(5), 4)
    q, k = jax.random.normal(kq, (B, T, I, J), jnp.bfloat16), jax.random.normal(kk, (B, S, J), jnp.bfloat16)
    w = jax.random.normal(kw, (B, T, I), jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32) % S, (B, T, K))
    target = jax.random.uniform(kt, (B, T, K))
    _, (_, dk, _) = sparse_loss_and_grads(q, k, w, idx, target, None, impl)
    _, (_, dk_exact, _) = sparse_loss_and_grads(q.astype(jnp.float32), k.astype(jnp.float32), w, idx, target,
                                                None, impl)
    assert dk.dtype == jnp.bfloat16
    assert_close(dk, dk_exact, 1e-2, "dk")


def test_empty_rows_and_mask_edge_cases():
    """All slots -1 everywhere: loss 0 with zero gradients; an all-zero query mask: loss 0."""
    q, k, w, qp, kp, kv, idx, target, _ = make_case("token_topk")
    empty = jnp.full_like(idx, -1)
    for impl in IMPLS:
        value, grads = sparse_loss_and_grads(q, k, w, empty, target, None, impl)
        assert float(value) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in grads)
        masked, _ = sparse_loss_and_grads(q, k, w, idx, target, jnp.zeros(idx.shape[:2], bool), impl)
        assert float(masked) == 0.0


def test_target_gets_no_gradient():
    q, k, w, qp, kp, kv, idx, target, _ = make_case("token_topk")
    for impl in IMPLS:
        # Called in this iteration; binding impl as a default only tells B023 so.
        grad = jax.jit(jax.grad(lambda t, impl=impl: sparse_indexer_kl(q, k, w, idx, t, impl=impl)))
        d_target = grad(target)
        assert float(jnp.abs(d_target).max()) == 0.0


def test_pallas_backward_is_deterministic():
    """Two backward runs (separate traces) give bit-identical gradients; dk is built without atomics."""
    q, k, w, qp, kp, kv, idx, target, _ = make_case("blocks", seed=2)

    def grads():
        def loss(q, k, w):
            return sparse_indexer_kl(q, k, w, idx, target, impl="pallas", query_block=16, key_block=8)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, w)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert float(jnp.abs(first[1]).max()) > 0.0


def test_memory_is_bounded():
    """Loss and gradients never build [B, T, S] (T = 64, S = 96) nor the gathered rows [B, T, K, J]."""
    B, T, S, I, J, K = 1, 64, 96, 2, 16, 16
    kq, kk, kw = jax.random.split(jax.random.key(0), 3)
    q, k = jax.random.normal(kq, (B, T, I, J)), jax.random.normal(kk, (B, S, J))
    w = jax.random.normal(kw, (B, T, I))
    qp, kp = slots(B, T) + 32, slots(B, S)
    idx = ix.select(q, k, w, qp, kp, CFG)
    target = jnp.ones(idx.shape)
    bound = B * T * S

    def largest(fn):
        return largest_intermediate(jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, w).jaxpr)

    assert bound < B * T * K * J
    assert largest(lambda *a: dense_kl(*a, qp, kp, None, idx, target, None)) >= bound
    for impl in IMPLS:
        fn = partial(sparse_indexer_kl, indices=idx, target=target, impl=impl, query_block=16, key_block=16)
        assert largest(fn) < bound


def test_bad_inputs():
    q, k, w, qp, kp, kv, idx, target, _ = make_case("token_topk")
    with pytest.raises(ValueError, match="impl"):
        sparse_indexer_kl(q, k, w, idx, target, impl="triton")
    with pytest.raises(ValueError, match="target"):
        sparse_indexer_kl(q, k, w, idx, target[..., :8])
    with pytest.raises(ValueError, match="integers"):
        sparse_indexer_kl(q, k, w, idx.astype(jnp.float32), target)
    with pytest.raises(ValueError, match="query_mask"):
        sparse_indexer_kl(q, k, w, idx, target, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="shape"):
        sparse_indexer_kl(q, k[:, :, :8], w, idx, target)
