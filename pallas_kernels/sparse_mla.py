"""Sparse MLA attention over top-k selected latent rows (docs/architecture.md#sparse-attention).

For query t, head n and slot k of the index set (indices[t, k] = -1 marks an empty slot):
    s[t,n,k] = scale * (q_lat[t,n] . c_kv[idx[t,k]] + q_rope[t,n] . k_rope[idx[t,k]])
    o_lat[t,n] = sum_k softmax_k(s[t,n,:])[k] * c_kv[idx[t,k]]      (a row with no valid slot gives zeros)
which is `longcat_jax.model.mla.attend_absorbed` before W_UV, with the boolean mask
`indices_to_mask(indices, S)`.

Reference: `pallas_kernels.sparse_mla.sparse_mla_reference`, beside the kernel because the model's dense
attention (`attend_absorbed`) also applies W_UV and gives probabilities per key, not per slot.

Memory is bounded by the selection, never by [T, S]: the kernel gathers only the selected rows, block_k slots
at a time, and keeps an online softmax (running max, running sum, f32 [N, R] accumulator) per query; the XLA
path and the backward work in query chunks of block_q, so the largest temporary is [B, block_q, K, R + Hr].

Backward (one jax.custom_vjp for both implementations): p is recomputed from the saved log-sum-exp; dq comes
out per query, and the per-slot key gradients are summed into [B, S, R + Hr] in a fixed order. The sum is
deterministic by construction: per query chunk the (key, contribution) pairs are stably sorted by key, reduced
with a segmented associative scan (a fixed tree), and each key's total is added once, so no scatter ever has
two writers to one row (GPU scatter-add with colliding indices uses atomics whose order, hence rounding,
varies); chunks are added in scan order. `probs` (the head-mean probability per slot, the sparse-stage KL
target of the indexer loss) is differentiable too.

With `window=W` (SI, `si_window`) the first W slots are each query's local window by offset: the XLA path
reads a query chunk's windows as one contiguous band of W + block_q rows (a matmul shared by the chunk) and
gathers only the other slots, in the same softmax; the kernel and the backward treat them as ordinary slots.

`sparse_mla_decode.sparse_mla_decode_paged` is the one-query-per-sequence form over a paged latent cache.

The Pallas kernels use the generic pallas_call + grid + BlockSpec API with power-of-two tiles and f32
accumulation, and lower with Triton (`tests/kernels/test_lowering.py`; small contractions go through
`tile_dot`); on CPU they run in interpret mode.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longcat_jax.ops.masks import indices_to_mask, softmax_f32
from pallas_kernels import si_window
from pallas_kernels.impl import backend, compiler_params, interpret, resolve
from pallas_kernels.tile_dot import einsum_2d

# A finite "minus infinity": a chunk with no valid slot keeps the running max finite (no inf - inf = nan).
_NEG = -1e30
_F32 = jnp.float32


class _Opts(NamedTuple):
    impl: str
    block_q: int
    block_k: int
    return_probs: bool
    window: int  # > 0: indices[..., :window] is the SI window by offset, read as a band (si_window)


# ---------------------------------------------------------------- math shared by the kernels and the XLA path
# Leading dims are free ("..."): the kernels call these per query ([N, R] queries, [bk, R] rows), the XLA path
# per query chunk ([B, Tc, N, R] queries, [B, Tc, K, R] rows).


def _mm(spec, a, b):
    """einsum with f32 accumulation; `a` is cast to `b`'s dtype so both operands share one (tensor-core) type.
    In a kernel (2-D tiles) it is `tile_dot`, which Triton takes at any tile size."""
    if a.ndim == b.ndim == 2:
        return einsum_2d(spec, a.astype(b.dtype), b)
    return jnp.einsum(spec, a.astype(b.dtype), b, preferred_element_type=_F32)


def _valid(idx, num_rows):
    # Out-of-range indices select nothing, like the mode="drop" scatter in indices_to_mask.
    return (idx >= 0) & (idx < num_rows)


def _scores(q_lat, q_rope, rows_c, rows_r, valid, scale):
    s = _mm("...nr,...kr->...nk", q_lat, rows_c) + _mm("...nh,...kh->...nk", q_rope, rows_r)
    return jnp.where(valid[..., None, :], s * scale, _NEG)


def _probs_from_lse(q_lat, q_rope, rows_c, rows_r, valid, lse, scale):
    s = _scores(q_lat, q_rope, rows_c, rows_r, valid, scale)
    return jnp.where(valid[..., None, :], jnp.exp(s - lse[..., None]), 0.0)


def _slots_backward(p, rows_c, rows_r, q_lat, q_rope, d_o, delta, g_probs, scale):
    """Softmax backward over a set of slots: (dq_lat, dq_rope, per-slot dc_kv, per-slot dk_rope), all f32.

    dp[n,k] = do[n] . c_kv[k] (+ g_probs[k] / N when probs is an output), ds = p * (dp - delta).
    """
    rows_c, rows_r = rows_c.astype(_F32), rows_r.astype(_F32)
    dp = _mm("...nr,...kr->...nk", d_o, rows_c)
    if g_probs is not None:
        dp = dp + g_probs[..., None, :] / p.shape[-2]
    ds = p * (dp - delta[..., None])
    d_q_lat, d_q_rope = _mm("...nk,...kr->...nr", ds, rows_c), _mm("...nk,...kh->...nh", ds, rows_r)
    d_c = scale * _mm("...nk,...nr->...kr", ds, q_lat.astype(_F32)) + _mm("...nk,...nr->...kr", p, d_o)
    d_r = scale * _mm("...nk,...nh->...kh", ds, q_rope.astype(_F32))
    return scale * d_q_lat, scale * d_q_rope, d_c, d_r


def _normalise(acc, m, l):
    """o = acc / l and lse = m + log l; a row with no valid slot (l = 0) gets o = 0 and lse = +inf
    (so p = 0)."""
    l_safe = jnp.where(l > 0, l, 1.0)
    o = jnp.where(l[..., None] > 0, acc / l_safe[..., None], 0.0)
    return o, jnp.where(l > 0, m + jnp.log(l_safe), jnp.inf)


def _probs_delta(p, g_probs):
    """sum_k p[n,k] g[k] / N: the probs output's share of the softmax-backward row sum sum_k p dp."""
    return jnp.sum(p * g_probs[..., None, :], axis=-1) / p.shape[-2]  # no matrix-vector dot: Triton has none


# ---------------------------------------------------------------- Pallas kernels (one program per query)


def _block(shape, grid_dims):
    """The block of one program of the (b, t) grid: the first `grid_dims` axes are indexed by (b, t) and
    squeezed, the rest is whole (the per-sequence c_kv / k_rope, read row by row through the indices)."""
    tail = tuple(shape[grid_dims:])
    return pl.BlockSpec((None,) * grid_dims + tail, lambda b, t: (b, t)[:grid_dims] + (0,) * len(tail))


def _query_grid_call(kernel, inputs, out_shapes):
    """pallas_call with one program per (sequence, query); inputs are (array, grid_dims) pairs, outputs f32
    [B, T, ...] per query."""
    B, T = out_shapes[0][:2]
    return pl.pallas_call(
        kernel,
        grid=(B, T),
        in_specs=[_block(x.shape, d) for x, d in inputs],
        out_specs=[_block(s, 2) for s in out_shapes],
        out_shape=[jax.ShapeDtypeStruct(s, _F32) for s in out_shapes],
        compiler_params=compiler_params(),
        interpret=interpret(),
    )(*(x for x, _ in inputs))


def _online_softmax(load_chunk, q_lat, q_rope, num_chunks, scale):
    """Online softmax over the slot chunks: (o [N, R] f32, lse [N] f32; +inf where no slot is valid)."""

    def body(c, carry):
        m, l, acc = carry
        valid, rows_c, rows_r = load_chunk(c)
        s = _scores(q_lat, q_rope, rows_c, rows_r, valid, scale)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        return m_new, alpha * l + p.sum(-1), alpha[:, None] * acc + _mm("nk,kr->nr", p, rows_c)

    N, R = q_lat.shape
    init = (jnp.full((N,), _NEG, _F32), jnp.zeros((N,), _F32), jnp.zeros((N, R), _F32))
    m, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return _normalise(acc, m, l)


def _row_loader(idx_ref, ckv_ref, kr_ref, block_k):
    def load_chunk(c):
        idx = idx_ref[pl.ds(c * block_k, block_k)]
        valid = _valid(idx, ckv_ref.shape[0])
        safe = jnp.where(valid, idx, 0)
        return valid, ckv_ref[safe, :], kr_ref[safe, :]

    return load_chunk


def _forward_kernel(idx_ref, ql_ref, qr_ref, ckv_ref, kr_ref, o_ref, lse_ref, *probs_ref, scale, block_k):
    num_chunks = idx_ref.shape[0] // block_k
    load_chunk = _row_loader(idx_ref, ckv_ref, kr_ref, block_k)
    q_lat, q_rope = ql_ref[...], qr_ref[...]
    o_ref[...], lse = _online_softmax(load_chunk, q_lat, q_rope, num_chunks, scale)
    lse_ref[...] = lse
    if probs_ref:  # a second pass, once the final lse is known

        @pl.loop(0, num_chunks)
        def _(c):
            valid, rows_c, rows_r = load_chunk(c)
            p = _probs_from_lse(q_lat, q_rope, rows_c, rows_r, valid, lse, scale)
            probs_ref[0][pl.ds(c * block_k, block_k)] = p.mean(0)


def _backward_kernel(idx_ref, ql_ref, qr_ref, do_ref, delta_ref, lse_ref, *refs, scale, block_k, with_g):
    g_ref = refs[0] if with_g else None
    ckv_ref, kr_ref, dql_ref, dqr_ref, dslot_c_ref, dslot_r_ref = refs[with_g:]
    num_chunks = idx_ref.shape[0] // block_k
    load_chunk = _row_loader(idx_ref, ckv_ref, kr_ref, block_k)
    q_lat, q_rope, d_o, lse = ql_ref[...], qr_ref[...], do_ref[...], lse_ref[...]

    def chunk(c):
        valid, rows_c, rows_r = load_chunk(c)
        g = g_ref[pl.ds(c * block_k, block_k)] if with_g else None
        return _probs_from_lse(q_lat, q_rope, rows_c, rows_r, valid, lse, scale), rows_c, rows_r, g

    delta = delta_ref[...]
    if with_g:  # the probs share of the row sum needs every slot before the first ds: one extra pass

        def add_probs_delta(c, acc):
            p, _, _, g = chunk(c)
            return acc + _probs_delta(p, g)

        delta = jax.lax.fori_loop(0, num_chunks, add_probs_delta, delta)

    def body(c, carry):
        p, rows_c, rows_r, g = chunk(c)
        dql, dqr, d_c, d_r = _slots_backward(p, rows_c, rows_r, q_lat, q_rope, d_o, delta, g, scale)
        dslot_c_ref[pl.ds(c * block_k, block_k), :] = d_c
        dslot_r_ref[pl.ds(c * block_k, block_k), :] = d_r
        return carry[0] + dql, carry[1] + dqr

    zeros = (jnp.zeros(q_lat.shape, _F32), jnp.zeros(q_rope.shape, _F32))
    dql_ref[...], dqr_ref[...] = jax.lax.fori_loop(0, num_chunks, body, zeros)


def _pallas_forward(q_lat, q_rope, c_kv, k_rope, indices, scale, opts):
    (B, T, N, R), K = q_lat.shape, indices.shape[-1]
    out_shapes = [(B, T, N, R), (B, T, N)] + [(B, T, K)] * opts.return_probs
    outs = _query_grid_call(
        functools.partial(_forward_kernel, scale=scale, block_k=opts.block_k),
        [(indices, 2), (q_lat, 2), (q_rope, 2), (c_kv, 1), (k_rope, 1)],
        out_shapes,
    )
    return outs[0], outs[1], outs[2] if opts.return_probs else None


def _pallas_chunk_grads(q_lat, q_rope, c_kv, k_rope, idx, d_o, delta, lse, g_probs, scale, opts):
    (B, Tc, N, R), Hr, K = q_lat.shape, q_rope.shape[-1], idx.shape[-1]
    per_query = [idx, q_lat, q_rope, d_o, delta, lse] + [g_probs] * (g_probs is not None)
    kernel = functools.partial(
        _backward_kernel, scale=scale, block_k=opts.block_k, with_g=g_probs is not None
    )
    out_shapes = [(B, Tc, N, R), (B, Tc, N, Hr), (B, Tc, K, R), (B, Tc, K, Hr)]
    return _query_grid_call(kernel, [(x, 2) for x in per_query] + [(c_kv, 1), (k_rope, 1)], out_shapes)


# --------------------------------------------------------------- XLA path (query chunks, all K slots at once)


def _to_chunks(x, block_q):
    """[B, T, ...] -> [T / block_q, B, block_q, ...] for lax.map / lax.scan over query chunks."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // block_q, block_q, *x.shape[2:]), 1, 0)


def _from_chunks(x):
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _gather_rows(c_kv, k_rope, idx):
    """Which slots are valid, and the selected rows [B, Tc, K, R] and [B, Tc, K, Hr]."""
    valid = _valid(idx, c_kv.shape[1])
    safe = jnp.where(valid, idx, 0)
    take = jax.vmap(lambda table, i: table[i])
    return valid, take(c_kv, safe), take(k_rope, safe)


def _attend_rows(q_lat, q_rope, valid, rows_c, rows_r, scale):
    """Softmax over all the gathered slots at once: (o f32, lse; +inf where no slot is valid, head-mean p)."""
    s = _scores(q_lat, q_rope, rows_c, rows_r, valid, scale)
    m = s.max(-1, keepdims=True)
    e = jnp.where(valid[..., None, :], jnp.exp(s - m), 0.0)
    l = e.sum(-1)
    p = e / jnp.where(l > 0, l, 1.0)[..., None]
    o, lse = _normalise(_mm("...nk,...kr->...nr", e, rows_c), m[..., 0], l)
    return o, lse, p.mean(-2)


def _attend_band_and_rows(q_lat, q_rope, band_c, band_r, band_ok, valid, rows_c, rows_r, scale, window):
    """`_attend_rows` over a chunk's contiguous band (rows [B, W+bq, .] shared by its queries, one matmul)
    plus each query's gathered rows, in one softmax; head-mean p per window slot, then per gathered slot."""
    s_band = _mm("btnr,bjr->btnj", q_lat, band_c) + _mm("btnh,bjh->btnj", q_rope, band_r)
    s_band = jnp.where(band_ok[:, :, None, :], s_band * scale, _NEG)
    s_rows = _scores(q_lat, q_rope, rows_c, rows_r, valid, scale)
    m = jnp.maximum(s_band.max(-1), s_rows.max(-1))[..., None]
    e_band = jnp.where(band_ok[:, :, None, :], jnp.exp(s_band - m), 0.0)
    e_rows = jnp.where(valid[..., None, :], jnp.exp(s_rows - m), 0.0)
    l = e_band.sum(-1) + e_rows.sum(-1)
    acc = _mm("btnj,bjr->btnr", e_band, band_c) + _mm("...nk,...kr->...nr", e_rows, rows_c)
    o, lse = _normalise(acc, m[..., 0], l)
    norm = jnp.where(l > 0, l, 1.0)[..., None]
    p_window = si_window.from_band((e_band / norm).mean(-2), q_lat.shape[1], window)
    return o, lse, jnp.concatenate([p_window, (e_rows / norm).mean(-2)], axis=-1)


def _xla_forward(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts):
    W, bq = opts.window, opts.block_q
    if W:  # W rows in front, so the band of query 0 starts at row 0; bq at the back for padded queries
        c_pad, r_pad = (_pad(jnp.pad(x, ((0, 0), (W, 0), (0, 0))), 1, bq) for x in (c_kv, k_rope))

    def one_chunk(xs):
        q_l, q_r, idx, c = xs
        if not W:
            return _attend_rows(q_l, q_r, *_gather_rows(c_kv, k_rope, idx), scale)
        qc = q_offset + c * bq  # key index of the chunk's first query = its band's first row in c_pad
        band_c, band_r = (jax.lax.dynamic_slice_in_dim(x, qc, W + bq, axis=1) for x in (c_pad, r_pad))
        band_ok = si_window.band_valid(idx[..., :W], bq)
        gathered = _gather_rows(c_kv, k_rope, idx[..., W:])
        return _attend_band_and_rows(q_l, q_r, band_c, band_r, band_ok, *gathered, scale, W)

    chunks = [_to_chunks(x, bq) for x in (q_lat, q_rope, indices)]
    o, lse, probs = jax.lax.map(one_chunk, (*chunks, jnp.arange(q_lat.shape[1] // bq)))
    return _from_chunks(o), _from_chunks(lse), _from_chunks(probs) if opts.return_probs else None


def _xla_chunk_grads(q_lat, q_rope, c_kv, k_rope, idx, d_o, delta, lse, g_probs, scale, opts):
    valid, rows_c, rows_r = _gather_rows(c_kv, k_rope, idx)
    p = _probs_from_lse(q_lat, q_rope, rows_c, rows_r, valid, lse, scale)
    if g_probs is not None:
        delta = delta + _probs_delta(p, g_probs)
    return _slots_backward(p, rows_c, rows_r, q_lat, q_rope, d_o, delta, g_probs, scale)


# ---------------------------------------------------------------- deterministic scatter of the slot gradients


def _scatter_add_slots(acc, idx, slot_grads):
    """acc [B, S, D] += the per-slot gradients [B, Tc, K, D] at rows idx [B, Tc, K], in a fixed order.

    Stable sort by row, segmented inclusive scan (fixed tree), then one add per distinct row: no two updates
    of a scatter share a row, so the result has the same bits on every run and every backend.
    """
    S = acc.shape[1]

    def one_sequence(acc_b, idx_b, grads_b):
        keys = jnp.where(_valid(idx_b, S), idx_b, S).reshape(-1)
        order = jnp.argsort(keys, stable=True)
        keys, vals = keys[order], grads_b.reshape(keys.shape[0], -1)[order]
        boundary = keys[1:] != keys[:-1]
        starts = jnp.concatenate([jnp.ones((1,), bool), boundary])

        def combine(a, b):
            return a[0] | b[0], jnp.where(b[0][..., None], b[1], a[1] + b[1])

        _, sums = jax.lax.associative_scan(combine, (starts, vals))
        last_of_row = jnp.concatenate([boundary, jnp.ones((1,), bool)])
        return acc_b.at[jnp.where(last_of_row, keys, S)].add(sums, mode="drop")

    return jax.vmap(one_sequence)(acc, idx, slot_grads)


# ---------------------------------------------------------------- custom VJP around either forward


def _forward(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts):
    if opts.impl == "pallas":  # the kernel reads the window slots like any other (consecutive rows)
        return _pallas_forward(q_lat, q_rope, c_kv, k_rope, indices, scale, opts)
    return _xla_forward(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts)


def _outputs(o32, probs, dtype, opts):
    return (o32.astype(dtype), probs) if opts.return_probs else (o32.astype(dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _sparse_mla_core(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts):
    o32, _, probs = _forward(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts)
    return _outputs(o32, probs, q_lat.dtype, opts)


def _core_fwd(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts):
    o32, lse, probs = _forward(q_lat, q_rope, c_kv, k_rope, indices, q_offset, scale, opts)
    return _outputs(o32, probs, q_lat.dtype, opts), (q_lat, q_rope, c_kv, k_rope, indices, o32, lse)


def _core_bwd(scale, opts, residuals, cotangents):
    q_lat, q_rope, c_kv, k_rope, indices, o32, lse = residuals
    d_o = cotangents[0].astype(_F32)
    g_probs = cotangents[1].astype(_F32) if opts.return_probs else None
    delta = jnp.sum(d_o * o32, axis=-1)  # sum_k p dp over the o part of dp, from the saved f32 output
    chunk_grads = _pallas_chunk_grads if opts.impl == "pallas" else _xla_chunk_grads
    R = c_kv.shape[-1]

    def step(acc, xs):
        q_l, q_r, idx, do_c, delta_c, lse_c, g_c = xs
        dql, dqr, d_c, d_r = chunk_grads(q_l, q_r, c_kv, k_rope, idx, do_c, delta_c, lse_c, g_c, scale, opts)
        return _scatter_add_slots(acc, idx, jnp.concatenate([d_c, d_r], axis=-1)), (dql, dqr)

    per_query = (q_lat, q_rope, indices, d_o, delta, lse, g_probs)
    xs = tuple(None if x is None else _to_chunks(x, opts.block_q) for x in per_query)
    acc = jnp.zeros((*c_kv.shape[:2], R + k_rope.shape[-1]), _F32)
    acc, (dql, dqr) = jax.lax.scan(step, acc, xs)
    return (
        _from_chunks(dql).astype(q_lat.dtype),
        _from_chunks(dqr).astype(q_rope.dtype),
        acc[..., :R].astype(c_kv.dtype),
        acc[..., R:].astype(k_rope.dtype),
        None,
        None,
    )


_sparse_mla_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------- public entry point and dense reference


def _pad(x, axis, amount, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, amount)
    return jnp.pad(x, widths, constant_values=value) if amount else x


def _slot_block(block_k, K):
    if block_k < 1 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two, got {block_k}")
    return min(block_k, pl.next_power_of_2(K))


def sparse_mla(
    q_lat, q_rope, c_kv, k_rope, indices, scale, *, window=0, q_offset=0, impl="auto", return_probs=False,
    block_q=16, block_k=64,
):
    """Absorbed MLA attention over the top-k selected latent rows, differentiable in all four float inputs.

    Args:
      q_lat [B, T, N, R] (q_nope with W_UK absorbed), q_rope [B, T, N, Hr], c_kv [B, S, R], k_rope [B, S, Hr].
      indices int [B, T, K]: selected key rows per query, -1 = empty slot; no duplicates within a row (a
        duplicate would count twice here but once in the mask reference).
      scale: the softmax scale (a Python float).
      window: 0, or SI's local window W (0 < W < K): indices[..., :W] are the window slots by offset
        (`si_window.window_indices`: slot r of query t is key q_offset + t - W + 1 + r, or -1), which the
        XLA path reads as one contiguous band per query chunk instead of gathering them. Same result as
        window=0 with the same indices, up to rounding.
      q_offset: key row of query 0 (int or int scalar array): 0 when the keys are the queries' own tokens,
        the cache length with a cache. Used only with a window.
      block_q: queries per chunk of the XLA path and of the backward (bounds the [B, block_q, K, R+Hr]
        temporaries).
      block_k: slots per step of the kernel (a power of two; capped at K rounded up to a power of two).
    Returns o_lat [B, T, N, R] in q_lat's dtype (f32 accumulation), and with return_probs also
    probs [B, T, K] f32: the head-mean attention probability of each slot of `indices` (0 at empty slots).
    """
    impl = resolve(impl)
    if impl == "pallas" and backend() == "mosaic":  # TPU: the Mosaic kernels (they import helpers from here)
        from pallas_kernels.tpu_sparse_mla import tpu_sparse_mla

        return tpu_sparse_mla(q_lat, q_rope, c_kv, k_rope, indices, scale, window=window, q_offset=q_offset,
                              return_probs=return_probs, block_q=block_q)
    B, T, _, R = q_lat.shape if q_lat.ndim == 4 else (None,) * 4
    Hr = q_rope.shape[-1]
    if B is None or q_rope.shape[:3] != q_lat.shape[:3] or q_rope.ndim != 4:
        raise ValueError(f"want q_lat [B,T,N,R] and q_rope [B,T,N,Hr]; got {q_lat.shape}, {q_rope.shape}")
    if c_kv.ndim != 3 or c_kv.shape[0] != B or c_kv.shape[2] != R or k_rope.shape != (B, c_kv.shape[1], Hr):
        raise ValueError(f"want c_kv [B,S,R={R}] and k_rope [B,S,Hr={Hr}]; got {c_kv.shape}, {k_rope.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (B, T):
        raise ValueError(f"want indices [B={B}, T={T}, K]; got {indices.shape}")
    if block_q < 1:
        raise ValueError(f"block_q must be positive, got {block_q}")
    K = indices.shape[-1]
    if not 0 <= window < K:
        raise ValueError(f"window must be in [0, K={K}), got {window}")
    opts = _Opts(impl, min(block_q, T), _slot_block(block_k, K), return_probs, window)
    pad_t, pad_k = -T % opts.block_q, -K % opts.block_k if impl == "pallas" else 0  # -1 pads select nothing
    indices = _pad(_pad(indices.astype(jnp.int32), 1, pad_t, -1), 2, pad_k, -1)
    q_lat, q_rope = _pad(q_lat, 1, pad_t), _pad(q_rope, 1, pad_t)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    outs = _sparse_mla_core(q_lat, q_rope, c_kv, k_rope, indices, q_offset, float(scale), opts)
    return (outs[0][:, :T], outs[1][:, :T, :K]) if return_probs else outs[0][:, :T]


def sparse_mla_reference(q_lat, q_rope, c_kv, k_rope, indices, scale):
    """Dense masked reference (materialises [B, N, T, S]; tests only):
    (o_lat, head-mean probs at the slots)."""
    mask = indices_to_mask(indices, c_kv.shape[1])
    scores = jnp.einsum("btnr,bsr->bnts", q_lat, c_kv) + jnp.einsum("btnh,bsh->bnts", q_rope, k_rope)
    p = softmax_f32(scores * scale, mask[:, None])
    o_lat = jnp.einsum("bnts,bsr->btnr", p.astype(q_lat.dtype), c_kv)
    at_slots = jnp.take_along_axis(p.mean(axis=1), jnp.clip(indices, 0, c_kv.shape[1] - 1), axis=-1)
    return o_lat, jnp.where(_valid(indices, c_kv.shape[1]), at_slots, 0.0)


__all__ = ["sparse_mla", "sparse_mla_reference"]
