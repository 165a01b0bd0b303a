"""Sparse MLA attention forward and backward, Mosaic (TPU) kernels (docs/architecture.md#sparse-attention).

The TPU form of `sparse_mla.sparse_mla` (same arguments, results and custom VJP contract). One program per
(sequence, query), as in the Triton kernels, but the K selected rows are not read by vector index from a
per-sequence block (Mosaic has no such gather, and a [S, R] block would not fit VMEM at long context): the
latent cache stays in HBM as one [B * S, R + Hr] table and each chunk of block_k selected rows is DMA-ed
into VMEM, double-buffered (`tpu_row_gather`), the row numbers read from an SMEM copy of the indices.

Forward: online softmax over the chunks (`tpu_mla_chunks`), o [N, R + Hr] and lse [N, 1] per query; with
`return_probs` the chunk scores stay in a VMEM scratch [chunks, N, block_k] and a last pass turns them into
the head-mean probability per slot once lse is known (no second gather).

Backward: per query chunk of block_q queries (a lax.scan, bounding the [B, block_q, K, R + Hr] slot
gradients), a kernel recomputes p from the saved lse, gives dq per query and the gradient of every slot's
row, and `sparse_mla._scatter_add_slots` sums those into [B, S, R + Hr] in a fixed order (deterministic,
docs/architecture.md#determinism). With a probs cotangent the kernel first streams the rows once to add
sum_k p g / N to each head's row sum, as the Triton kernel does.

Every block is whole in its last two dims (Mosaic's rule): per-query q [N, W], lse [N, 1], the indices as
SMEM [1, K] and VMEM [chunks, 1, block_k], probs [chunks, 1, block_k], slot gradients [chunks, block_k, W].

Reference: `pallas_kernels.sparse_mla.sparse_mla_reference` (tests/kernels/test_tpu_sparse_mla.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_mla_chunks as mc
from pallas_kernels.impl import mosaic_params, tpu_interpret
from pallas_kernels.sparse_mla import _from_chunks, _pad, _scatter_add_slots, _to_chunks
from pallas_kernels.tpu_row_gather import double_buffer_shapes, safe_row, stream_rows
from pallas_kernels.tpu_sparse_mla_decode import _slot_block


class _Opts(NamedTuple):
    block_q: int
    block_k: int
    return_probs: bool


def _per_query(*shape):
    """Block of one (b, t) program: both grid axes squeezed, the rest whole."""
    return pl.BlockSpec((None, None, *shape), lambda b, t: (b, t) + (0,) * len(shape))


def _index_specs(K, block_k):
    """The indices twice: SMEM [1, K] for the DMA row numbers, VMEM [chunks, 1, block_k] for the masks."""
    smem = pl.BlockSpec((None, None, 1, K), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM)
    return [smem, _per_query(K // block_k, 1, block_k)]


def _index_args(indices, block_k):
    B, T, K = indices.shape
    return [indices[:, :, None], indices.reshape(B, T, K // block_k, 1, block_k)]


def _row_locator(idx_smem, seq_len):
    """Slot k of program (b, t) reads row b * S + indices[b, t, k] of the flat [B * S, W] table."""
    b = pl.program_id(0)

    def locate(k):
        return 0, b * seq_len + safe_row(idx_smem[0, k], seq_len)

    return locate


def _forward_kernel(idx_smem, idx_vmem, q_ref, kv_hbm, o_ref, lse_ref, *rest, scale, seq_len, with_probs):
    probs_ref, s_scratch, buf, sems = rest if with_probs else (None, None, *rest)
    num_chunks = idx_vmem.shape[0]
    q = q_ref[...]

    def body(c, rows, state):
        valid = mc.valid_slots(idx_vmem[c], seq_len)
        s = mc.scores(q, rows, valid, scale)
        if with_probs:
            s_scratch[c] = s
        return mc.online_update(state, s, valid, rows)

    state = stream_rows((kv_hbm,), _row_locator(idx_smem, seq_len), buf, sems, num_chunks, body,
                        mc.init_state(*q.shape))
    o_ref[...], lse = mc.finish(state)
    lse_ref[...] = lse
    if with_probs:

        @pl.loop(0, num_chunks)
        def _(c):
            valid = mc.valid_slots(idx_vmem[c], seq_len)
            probs_ref[c] = mc.probs_from_lse(s_scratch[c], valid, lse).mean(axis=0, keepdims=True)


def _forward_call(q, kv, indices, scale, opts):
    """q [B, T, N, W], kv [B, S, W], indices [B, T, Kp] -> o [B, T, N, W] f32, lse [B, T, N, 1], probs
    [B, T, Kp] or None."""
    (B, T, N, W), S, Kp = q.shape, kv.shape[1], indices.shape[-1]
    nc, bk = Kp // opts.block_k, opts.block_k
    out_specs = [_per_query(N, W), _per_query(N, 1)] + [_per_query(nc, 1, bk)] * opts.return_probs
    out_shape = [jax.ShapeDtypeStruct(s, mc.F32) for s in [(B, T, N, W), (B, T, N, 1), (B, T, nc, 1, bk)]]
    scratch = [pltpu.VMEM((nc, N, bk), mc.F32)] * opts.return_probs + double_buffer_shapes(bk, W, kv.dtype)
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, seq_len=S, with_probs=opts.return_probs),
        grid=(B, T),
        in_specs=[*_index_specs(Kp, bk), _per_query(N, W), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=out_specs,
        out_shape=out_shape[:len(out_specs)],
        scratch_shapes=scratch,
        compiler_params=mosaic_params("parallel", "parallel"),
        interpret=tpu_interpret(),
    )(*_index_args(indices, bk), q, kv.reshape(B * S, W))
    return outs[0], outs[1], outs[2].reshape(B, T, Kp) if opts.return_probs else None


def _backward_kernel(idx_smem, idx_vmem, q_ref, do_ref, delta_ref, lse_ref, *rest, scale, seq_len, with_g):
    g_ref = rest[0] if with_g else None
    kv_hbm, dq_ref, dslot_ref, buf, sems = rest[with_g:]
    num_chunks = idx_vmem.shape[0]
    locate = _row_locator(idx_smem, seq_len)
    q, d_o, lse = q_ref[...], do_ref[...], lse_ref[...]

    def probs(c, rows):
        valid = mc.valid_slots(idx_vmem[c], seq_len)
        return mc.probs_from_lse(mc.scores(q, rows, valid, scale), valid, lse)

    delta = delta_ref[...]
    if with_g:  # the probs share of each head's row sum needs every slot before the first ds: one more pass

        def add_probs_delta(c, rows, acc):
            return acc + jnp.sum(probs(c, rows) * g_ref[c], axis=-1, keepdims=True) / q.shape[0]

        delta = stream_rows((kv_hbm,), locate, buf, sems, num_chunks, add_probs_delta, delta)

    def body(c, rows, d_q):
        g = g_ref[c] if with_g else None
        dq_c, d_rows = mc.slot_grads(probs(c, rows), rows, q, d_o, delta, g, scale)
        dslot_ref[c] = d_rows
        return d_q + dq_c

    dq_ref[...] = stream_rows((kv_hbm,), locate, buf, sems, num_chunks, body, jnp.zeros(q.shape, mc.F32))


def _backward_call(q, kv, idx, d_o, delta, lse, g_probs, scale, opts):
    """One query chunk: q, d_o [B, Tc, N, W], delta, lse [B, Tc, N, 1], idx [B, Tc, Kp], g_probs [B, Tc, Kp]
    or None -> dq [B, Tc, N, W], slot gradients [B, Tc, Kp, W], f32."""
    (B, Tc, N, W), S, Kp = q.shape, kv.shape[1], idx.shape[-1]
    nc, bk, with_g = Kp // opts.block_k, opts.block_k, g_probs is not None
    g_args = [g_probs.reshape(B, Tc, nc, 1, bk)] if with_g else []
    dq, dslot = pl.pallas_call(
        functools.partial(_backward_kernel, scale=scale, seq_len=S, with_g=with_g),
        grid=(B, Tc),
        in_specs=[*_index_specs(Kp, bk), _per_query(N, W), _per_query(N, W), _per_query(N, 1),
                  _per_query(N, 1)] + [_per_query(nc, 1, bk)] * with_g + [pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[_per_query(N, W), _per_query(nc, bk, W)],
        out_shape=[jax.ShapeDtypeStruct(s, mc.F32) for s in [(B, Tc, N, W), (B, Tc, nc, bk, W)]],
        scratch_shapes=double_buffer_shapes(bk, W, kv.dtype),
        compiler_params=mosaic_params("parallel", "parallel"),
        interpret=tpu_interpret(),
    )(*_index_args(idx, bk), q, d_o, delta, lse, *g_args, kv.reshape(B * S, W))
    return dq, dslot.reshape(B, Tc, Kp, W)


# ---------------------------------------------------------------- custom VJP (as sparse_mla._sparse_mla_core)


def _outputs(o32, probs, dtype, opts):
    return (o32.astype(dtype), probs) if opts.return_probs else (o32.astype(dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _core(q, kv, indices, scale, opts):
    o32, _, probs = _forward_call(q, kv, indices, scale, opts)
    return _outputs(o32, probs, q.dtype, opts)


def _core_fwd(q, kv, indices, scale, opts):
    o32, lse, probs = _forward_call(q, kv, indices, scale, opts)
    return _outputs(o32, probs, q.dtype, opts), (q, kv, indices, o32, lse)


def _core_bwd(scale, opts, residuals, cotangents):
    q, kv, indices, o32, lse = residuals
    d_o = cotangents[0].astype(mc.F32)  # zero in the k_rope columns: the caller keeps only o[..., :R]
    g_probs = cotangents[1].astype(mc.F32) if opts.return_probs else None
    delta = jnp.sum(d_o * o32, axis=-1, keepdims=True)

    def step(acc, xs):
        q_c, idx_c, do_c, delta_c, lse_c, g_c = xs
        dq, dslot = _backward_call(q_c, kv, idx_c, do_c, delta_c, lse_c, g_c, scale, opts)
        return _scatter_add_slots(acc, idx_c, dslot), dq

    per_query = (q, indices, d_o, delta, lse, g_probs)
    xs = tuple(None if x is None else _to_chunks(x, opts.block_q) for x in per_query)
    acc, dq = jax.lax.scan(step, jnp.zeros(kv.shape, mc.F32), xs)
    return _from_chunks(dq).astype(q.dtype), acc.astype(kv.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def tpu_sparse_mla(q_lat, q_rope, c_kv, k_rope, indices, scale, *, window=0, q_offset=0, return_probs=False,
                   block_q=16, block_k=128):
    """`sparse_mla.sparse_mla` as Mosaic kernels: same arguments and results, differentiable in the four
    float inputs. `window` and `q_offset` are accepted for the same signature; the kernels read the window
    slots like any other (as the Triton kernels do). block_k: slots per DMA chunk (a power of two >= 8).

    Returns o_lat [B, T, N, R] in q_lat's dtype, and with return_probs also probs [B, T, K] f32.
    """
    del q_offset  # only the XLA path's window band uses it
    B, T, N, R = q_lat.shape
    Hr, K = q_rope.shape[-1], indices.shape[-1]
    if q_rope.shape[:3] != (B, T, N) or c_kv.shape[::2] != (B, R) or k_rope.shape != (B, c_kv.shape[1], Hr):
        raise ValueError(f"want q_lat [B,T,N,R], q_rope [B,T,N,Hr], c_kv [B,S,R], k_rope [B,S,Hr]; got "
                         f"{q_lat.shape}, {q_rope.shape}, {c_kv.shape}, {k_rope.shape}")
    if indices.shape[:2] != (B, T) or not 0 <= window < K:
        raise ValueError(f"want indices [B={B}, T={T}, K] and 0 <= window < K; got {indices.shape}, {window}")
    opts = _Opts(min(block_q, T), _slot_block(block_k, K), return_probs)
    pad_t, pad_k = -T % opts.block_q, -K % opts.block_k  # -1 pads select nothing
    indices = _pad(_pad(indices.astype(jnp.int32), 1, pad_t, -1), 2, pad_k, -1)
    q = _pad(jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1), 1, pad_t)
    kv = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)
    outs = _core(q, kv, indices, float(scale), opts)
    o = outs[0][:, :T, :, :R]
    return (o, outs[1][:, :T, :K]) if return_probs else o


__all__ = ["tpu_sparse_mla"]
