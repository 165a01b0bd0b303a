"""Sparse MLA (pallas_kernels/sparse_mla.py) against the dense masked references, both implementations.

The model-level oracle is `mla.attend_absorbed` with mask = indices_to_mask(indices) & causal; the o_lat-level
oracle is `sparse_mla_reference`. Pallas runs in interpret mode on CPU, so shapes stay tiny.
"""

import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.config import Config
from longcat_jax.model.mla import attend_absorbed
from longcat_jax.ops.masks import attention_mask, indices_to_mask
from pallas_kernels.si_window import window_indices
from pallas_kernels.sparse_mla import _scatter_add_slots, sparse_mla, sparse_mla_reference
from pallas_kernels.sparse_mla_decode import sparse_mla_decode_paged

IMPLS = ("xla", "pallas")
BLOCKS = {"return_probs": True, "block_q": 4, "block_k": 4}  # several query and slot chunks per call
CFG = Config.tiny()  # N=4, R=16, Hn=16, Hr=8


def causal_indices(rng, B, T, S, K, empty_share=0.25):
    """Distinct causal key indices per query (query t sits at position S - T + t),
    -1 padded / randomly blanked."""
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            allowed = rng.permutation(S - T + t + 1)[:K]
            idx[b, t, : len(allowed)] = allowed
    idx[rng.random(idx.shape) < empty_share] = -1
    return idx


def normal(rng, *shapes, dtype=jnp.float32):
    """numpy draws: eager jax.random compiles a program per shape, seconds each on a busy CPU."""
    return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]


def inputs(seed, B, T, S, N, R, Hr, dtype=jnp.float32):
    return normal(
        np.random.default_rng(seed), (B, T, N, R), (B, T, N, Hr), (B, S, R), (B, S, Hr), dtype=dtype
    )


def probe_loss(o_lat, probs):
    """A scalar that weights every output element differently, so a wrong gradient anywhere shows."""
    w_o = jnp.sin(jnp.arange(o_lat.size, dtype=jnp.float32)).reshape(o_lat.shape)
    w_p = jnp.cos(jnp.arange(probs.size, dtype=jnp.float32)).reshape(probs.shape)
    return jnp.sum(o_lat.astype(jnp.float32) * w_o) + jnp.sum(probs * w_p)


def outputs_and_grads(fn, args):
    """(fn(*args) = (o, probs), grads of probe_loss w.r.t. the four args), in one jit: a single compile is far
    cheaper on CPU than op-by-op dispatch of the interpreted kernel."""

    def loss(*a):
        outs = fn(*a)
        return probe_loss(*outs), outs

    grad_fn = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    grads, outs = jax.jit(grad_fn)(*args)
    return outs, grads


def assert_close(actual, expected, tol):
    """Error relative to the largest reference magnitude (bf16 grads have no meaningful per-element rtol)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6)
    assert err <= tol, f"relative max error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_probs_grads_and_determinism(impl, dtype):
    B, T, S, K = 2, 8, 24, 8
    rng = np.random.default_rng(0)
    args = inputs(1, B, T, S, CFG.num_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim, dtype)
    idx = jnp.asarray(causal_indices(rng, B, T, S, K))
    scale = CFG.softmax_scale

    def fast(*a):
        return sparse_mla(*a, idx, scale, impl=impl, **BLOCKS)

    def reference(*a):
        return sparse_mla_reference(*a, idx, scale)

    # The bf16 reference rounds scores and p to bf16 while the kernel keeps them in f32: compare against the
    # f32 reference on the same (bf16-rounded) inputs.
    f32_args = [a.astype(jnp.float32) for a in args]
    (o, probs), grads = outputs_and_grads(fast, args)
    (o_ref, probs_ref), grads_ref = outputs_and_grads(reference, f32_args)
    assert o.dtype == dtype and probs.dtype == jnp.float32 and probs.shape == (B, T, K)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_close(o, o_ref, tol)
    assert_close(probs, probs_ref, tol)
    assert np.all(np.asarray(probs)[np.asarray(idx) < 0] == 0)
    for g, g_ref, a in zip(grads, grads_ref, args):
        assert g.dtype == a.dtype
        assert_close(g, g_ref, 1e-5 if dtype == jnp.float32 else 3e-2)
    # Determinism: a second, separately built and compiled backward gives the same bits (T=8 queries over
    # S=24 keys: many keys are selected by several queries, so the c_kv / k_rope sums do collide).
    _, again = outputs_and_grads(fast, args)
    for g, g_again in zip(grads, again):
        assert np.array_equal(np.asarray(g), np.asarray(g_again))


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_attend_absorbed_with_causal_mask(impl):
    """End to end against the model's reference: W_UK folded into q_lat, W_UV applied to o_lat; gradients of
    q_nope, q_rope, c_kv, k_rope through both."""
    B, T, S, K, cfg = 2, 6, 16, 8, CFG
    N, Hn, R, Hr = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes = [(B, T, N, Hn), (B, T, N, Hr), (B, S, R), (B, S, Hr), (R, N, Hn + cfg.v_head_dim)]
    *args, w_kv_up = normal(np.random.default_rng(2), *shapes)
    w_kv_up = w_kv_up * 0.3
    idx = jnp.asarray(causal_indices(np.random.default_rng(3), B, T, S, K))
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    mask = indices_to_mask(idx, S) & attention_mask(positions[:, S - T :], positions)

    def via_kernel(q_nope, q_rope, c_kv, k_rope):
        q_lat = jnp.einsum("btnh,rnh->btnr", q_nope, w_kv_up[..., :Hn])
        o_lat, probs = sparse_mla(q_lat, q_rope, c_kv, k_rope, idx, cfg.softmax_scale, impl=impl, **BLOCKS)
        return jnp.einsum("btnr,rnh->btnh", o_lat, w_kv_up[..., Hn:]), probs

    def via_reference(*a):
        o, p_dense = attend_absorbed(*a, w_kv_up, mask, cfg)
        p = jnp.take_along_axis(p_dense, jnp.maximum(idx, 0), axis=-1)
        return o, jnp.where(idx >= 0, p, 0.0)

    outs, grads = outputs_and_grads(via_kernel, args)
    outs_ref, grads_ref = outputs_and_grads(via_reference, args)
    for actual, expected in zip(outs + grads, outs_ref + grads_ref):
        assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_cases_empty_rows_padding_first_and_last_key(impl):
    """S=13 and T=5 are not multiples of any block; K=16 > S so most slots are -1 padding; one row selects
    nothing; rows select key 0 and key S-1; an out-of-range index selects nothing (like indices_to_mask)."""
    B, T, S, K = 2, 5, 13, 16
    args = inputs(4, B, T, S, 2, 32, 8)
    idx = causal_indices(np.random.default_rng(5), B, T, S, K, empty_share=0.1)
    idx[1, 2] = -1  # a query with no key at all
    idx[0, 4] = -1
    idx[0, 4, 5:7] = [S - 1, 0]  # the last query (position S-1) takes only the first and the last key
    idx[0, 3] = -1
    idx[0, 3, -1] = 0  # a single key: p = 1
    idx[1, 4, 0] = S  # out of range: dropped
    idx = jnp.asarray(idx)
    assert np.any(np.asarray(idx) == 0) and np.any(np.asarray(idx) == S - 1)

    def fast(*a):
        return sparse_mla(*a, idx, 0.5, impl=impl, return_probs=True, block_q=2, block_k=4)

    (o, probs), grads = outputs_and_grads(fast, args)
    (o_ref, probs_ref), grads_ref = outputs_and_grads(lambda *a: sparse_mla_reference(*a, idx, 0.5), args)
    assert_close(o, o_ref, 1e-5)
    assert_close(probs, probs_ref, 1e-5)
    assert np.all(np.asarray(o[1, 2]) == 0) and np.all(np.asarray(probs[1, 2]) == 0)
    np.testing.assert_allclose(np.asarray(probs.sum(-1))[np.asarray(idx).max(-1) >= 0], 1.0, rtol=1e-5)

    for g, g_ref in zip(grads, grads_ref):
        assert np.all(np.isfinite(np.asarray(g)))
        assert_close(g, g_ref, 1e-5)
    assert np.all(np.asarray(grads[0][1, 2]) == 0)  # no key: no query gradient
    never_selected = np.setdiff1d(np.arange(S), np.asarray(idx[1]))
    assert np.all(np.asarray(grads[2][1, never_selected]) == 0)


def all_shapes(jaxpr):
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}
    for sub in jex_core.subjaxprs(jaxpr):
        shapes |= all_shapes(sub)
    return shapes


def si_indices(rng, B, T, S, W, K, doc_start):
    """[window slots by offset | the rest]: each query's SI window (`si_window.window_indices`, documents
    starting at keys 0 and doc_start) then K - W - 1 random earlier keys of its document in random order, -1
    padded; query t sits at key S - T + t."""
    kp = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    seg = (kp >= doc_start).astype(np.int32) + 1
    kp = np.where(kp >= doc_start, kp - doc_start, kp)
    qp, q_seg = kp[:, S - T :], seg[:, S - T :]
    qp, kp, q_seg, seg = map(jnp.asarray, (qp, kp, q_seg, seg))
    win = np.asarray(window_indices(qp, kp, W, S - T, q_segment_ids=q_seg, k_segment_ids=seg))
    rest = np.full((B, T, K - W), -1, np.int32)
    for b, t in np.ndindex(B, T):
        q = S - T + t
        first = doc_start if q >= doc_start else 0
        earlier = rng.permutation(np.arange(first, max(first, q - W + 1)))[: K - W - 1]
        rest[b, t, : len(earlier)] = earlier
    return np.concatenate([win, rest], axis=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,S,doc_start", [(12, 12, 7), (8, 20, 0)], ids=["self_packed", "cache_offset"])
def test_window_band_equals_gathered_slots(impl, T, S, doc_start):
    """window=W (the SI window's W leading slots read as a contiguous band) gives the same outputs, per-slot
    probs and gradients as the reference, with a document boundary and with a cache offset."""
    B, K, W = 2, 8, 4
    args = inputs(3, B, T, S, CFG.num_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim)
    idx = si_indices(np.random.default_rng(4), B, T, S, W, K, doc_start)
    assert (idx[..., W:] >= 0).any() and (idx[..., :W] == -1).any() == (doc_start > 0)  # doc start: holes
    idx = jnp.asarray(idx)
    scale = CFG.softmax_scale

    def band(*a):
        return sparse_mla(*a, idx, scale, window=W, q_offset=S - T, impl=impl, **BLOCKS)

    (o, probs), grads = outputs_and_grads(band, args)
    (o_ref, probs_ref), grads_ref = outputs_and_grads(lambda *a: sparse_mla_reference(*a, idx, scale), args)
    assert_close(o, o_ref, 1e-5)
    assert_close(probs, probs_ref, 1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_query_by_key_intermediate(impl):
    """Forward and backward never hold a [T, S]-sized array (sizes chosen so T, S and T*S are distinctive)."""
    B, T, S, N, R, Hr, K = 1, 12, 40, 2, 16, 8, 4
    args = inputs(11, B, T, S, N, R, Hr)
    idx = jnp.asarray(causal_indices(np.random.default_rng(12), B, T, S, K))

    def quadratic(shapes):
        return [s for s in shapes if (T in s and S in s) or any(d % (T * S) == 0 and d > 0 for d in s)]

    def loss(fn):
        return lambda *a: probe_loss(*fn(*a))

    ours = all_shapes(
        jax.make_jaxpr(
            jax.grad(loss(lambda *a: sparse_mla(*a, idx, 0.3, impl=impl, **BLOCKS)), argnums=(0, 1, 2, 3))
        )(*args).jaxpr
    )
    dense = all_shapes(jax.make_jaxpr(loss(lambda *a: sparse_mla_reference(*a, idx, 0.3)))(*args).jaxpr)
    assert quadratic(dense), "the check must see the reference's [T, S] mask"
    assert not quadratic(ours)


def test_slot_scatter_sums_colliding_rows_exactly():
    """The sorted segmented sum must equal a float64 scatter-add, with -1 and out-of-range slots dropped."""
    rng = np.random.default_rng(8)
    B, Tc, K, S, D = 2, 6, 5, 7, 3
    idx = rng.integers(-1, S + 1, size=(B, Tc, K)).astype(np.int32)
    vals = rng.standard_normal((B, Tc, K, D)).astype(np.float32)
    acc = rng.standard_normal((B, S, D)).astype(np.float32)
    expected = acc.astype(np.float64)
    for b, t, k in np.ndindex(B, Tc, K):
        if 0 <= idx[b, t, k] < S:
            expected[b, idx[b, t, k]] += vals[b, t, k]
    summed = jax.jit(_scatter_add_slots)(jnp.asarray(acc), jnp.asarray(idx), jnp.asarray(vals))
    np.testing.assert_allclose(summed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_decode_with_shuffled_page_table(impl, dtype):
    B, N, R, Hr, page_size, pages_per_seq, K = 2, 4, 16, 8, 4, 4, 8
    num_pages = 11  # more physical pages than the sequences use; the unused ones hold garbage
    rng = np.random.default_rng(9)
    q_lat, q_rope, kv_pages = normal(rng, (B, N, R), (B, N, Hr), (num_pages, page_size, R + Hr), dtype=dtype)
    page_table = jnp.asarray(
        rng.permutation(num_pages)[: B * pages_per_seq].reshape(B, pages_per_seq), jnp.int32
    )
    lengths = [13, 16]  # the sequence's current length; its new token attends to positions < length
    idx = np.full((B, K), -1, np.int32)
    for b, length in enumerate(lengths):
        idx[b, : K - 2] = rng.permutation(np.arange(1, length - 1))[: K - 2]  # slot K-2 stays empty
    idx[0, -1], idx[1, -1] = lengths[0] - 1, 0  # the last and the first position
    idx = jnp.asarray(idx)

    decode = jax.jit(functools.partial(sparse_mla_decode_paged, scale=0.3, impl=impl, block_k=4))
    o = decode(q_lat, q_rope, kv_pages, page_table, idx)

    @jax.jit
    def reference(q_lat, q_rope, kv_pages, page_table, idx):
        linear = kv_pages[page_table].reshape(B, pages_per_seq * page_size, R + Hr).astype(jnp.float32)
        q_lat, q_rope = q_lat[:, None].astype(jnp.float32), q_rope[:, None].astype(jnp.float32)
        o_lat, _ = sparse_mla_reference(q_lat, q_rope, linear[..., :R], linear[..., R:], idx[:, None], 0.3)
        return o_lat[:, 0]

    o_ref = reference(q_lat, q_rope, kv_pages, page_table, idx)
    assert o.dtype == dtype and o.shape == (B, N, R)
    assert_close(o, o_ref, 1e-5 if dtype == jnp.float32 else 1e-2)

    # The new token's row given apart (not yet in its page) equals the same row written to the page
    new_pos = jnp.asarray([lengths[0] - 1, 0], jnp.int32)
    new_rows = normal(rng, (B, R + Hr), dtype=dtype)[0]
    pages_b, rows_b = np.asarray(kv_pages).copy(), np.asarray(new_rows)
    for b, p in enumerate(np.asarray(new_pos)):
        pages_b[page_table[b, p // page_size], p % page_size] = rows_b[b]
    written = decode(q_lat, q_rope, jnp.asarray(pages_b), page_table, idx)
    apart = decode(q_lat, q_rope, kv_pages, page_table, idx, new_rows=new_rows, new_pos=new_pos)
    assert_close(apart, written, 1e-6 if dtype == jnp.float32 else 1e-2)
    assert not np.allclose(np.asarray(written, np.float32), np.asarray(o, np.float32), atol=1e-3)


def test_bad_inputs_raise():
    q_lat, q_rope, c_kv, k_rope = inputs(0, 1, 2, 4, 2, 16, 8)
    idx = jnp.zeros((1, 2, 4), jnp.int32)
    with pytest.raises(ValueError, match="impl"):
        sparse_mla(q_lat, q_rope, c_kv, k_rope, idx, 1.0, impl="cuda")
    with pytest.raises(ValueError, match="c_kv"):
        sparse_mla(q_lat, q_rope, c_kv[..., :8], k_rope, idx, 1.0)
    with pytest.raises(ValueError, match="indices"):
        sparse_mla(q_lat, q_rope, c_kv, k_rope, idx[:, :1], 1.0)
    with pytest.raises(ValueError, match="power of two"):
        sparse_mla(q_lat, q_rope, c_kv, k_rope, idx, 1.0, block_k=3)
    with pytest.raises(ValueError, match="R\\+Hr"):
        sparse_mla_decode_paged(
            q_lat[:, 0], q_rope[:, 0], jnp.zeros((3, 4, 20)), jnp.zeros((1, 2), jnp.int32), idx[:, 0], 1.0
        )
