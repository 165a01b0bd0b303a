"""Sparse-stage indexer KL, forward and backward, Mosaic (TPU) kernels
(docs/architecture.md#indexer-training).

The TPU form of `indexer_kl._kl_rows_pallas`: per query the KL between the target and the softmax of the
indexer scores over its K selected keys,

    z[k] = sum_i w[t,i] ReLU(q[t,i] . k[idx[t,k]]),   kl_t = KL(p_t || softmax(z over valid slots)),

same arguments (T padded, indices already -1 or in [0, S), target f32 without gradient) and the same custom
VJP contract: per-query kl [B, T] f32, gradients for q, k and w.

One program per (batch row, query), as `tpu_sparse_mla`: the K selected key rows are not read by vector index
from a per-row block (Mosaic has no such gather and [S, J] would not fit VMEM at long context) but DMA-ed from
the [B * S, J] key table in HBM, one row per slot, block_k slots per chunk, double-buffered
(`tpu_row_gather`), the row numbers read from an SMEM copy of the indices.

Forward: per chunk the head logits [I, block_k] are one MXU matmul q [I, J] . rows^T, z a sublane sum of
w [I, 1] * ReLU(logits); the masked z of every chunk stay in a VMEM scratch [chunks, 1, block_k] while the
running max, exp-sum and target mass accumulate, then a last pass over the scratch gives the KL with the
reference's formula (`indexer_kl._row_kl`: masked logit -1e9, p = target / mass, 0 log 0 = 0). It also
returns the log-normaliser per query, the backward's residual.

Backward: per query chunk of block_q queries (a lax.scan, bounding the [B, block_q, K, J] slot gradients),
a kernel streams the rows again and gives, per query, dz = g (P softmax(z) - p) at the valid slots
(`indexer_kl._slot_grad`), dw [I] = sum_k ReLU(logits) dz, dq [I, J] = (w dz through the ReLU) . rows and
each slot's key-row gradient [block_k, J] = (w dz through the ReLU)^T . q; `sparse_mla._scatter_add_slots`
sums those into dk [B, S, J] in a fixed order (deterministic, docs/architecture.md#determinism), as the
sparse MLA backward does.

Blocks are whole in their last two dims (Mosaic's rule): q [I, J], w [I, 1], the indices as SMEM [1, K] and
VMEM [chunks, 1, block_k], the target [chunks, 1, block_k], per-query scalars [1, 1] (out) or SMEM [1, 4]
(in), slot gradients [chunks, block_k, J].

Reference: `longcat_jax.model.indexer_loss.indexer_kl` over the dense masked scores, through
`indexer_kl.sparse_indexer_kl(impl="pallas")` on a (simulated) TPU (tests/kernels/test_tpu_indexer_kl.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.impl import mosaic_params, tpu_interpret
from pallas_kernels.sparse_mla import _from_chunks, _pad, _scatter_add_slots, _to_chunks
from pallas_kernels.tpu_row_gather import double_buffer_shapes, safe_row, stream_rows
from pallas_kernels.tpu_sparse_mla_decode import _slot_block

F32 = jnp.float32
_MASKED = -1e9  # indexer_kl's masked logit: finite, so an all-empty row stays NaN-free
_NT = (((1,), (1,)), ((), ()))  # a[M, C] . b[K, C] -> [M, K]
_NN = (((1,), (0,)), ((), ()))  # a[M, C] . b[C, K] -> [M, K]
_TN = (((0,), (0,)), ((), ()))  # a[C, M] . b[C, K] -> [M, K]


def _dot(a, b, dims):
    """MXU matmul in one operand type, f32 accumulation; f32 operands at full precision (the reference's)."""
    precision = jax.lax.Precision.HIGHEST if b.dtype == F32 else None
    return jax.lax.dot_general(a.astype(b.dtype), b, dims, precision=precision, preferred_element_type=F32)


def _per_query(*shape):
    """Block of one (b, t) program: both grid axes squeezed, the rest whole."""
    return pl.BlockSpec((None, None, *shape), lambda b, t: (b, t) + (0,) * len(shape))


def _slot_specs(K, block_k):
    """The indices twice (SMEM [1, K] for the DMA row numbers, VMEM [chunks, 1, block_k] for the masks) and
    the target [chunks, 1, block_k]."""
    smem = pl.BlockSpec((None, None, 1, K), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM)
    return [smem, _per_query(K // block_k, 1, block_k), _per_query(K // block_k, 1, block_k)]


def _slot_args(idx, target, block_k):
    B, T, K = idx.shape
    chunks = (B, T, K // block_k, 1, block_k)
    return [idx[:, :, None], idx.reshape(chunks), target.reshape(chunks)]


def _row_locator(idx_smem, seq_len):
    """Slot k of program (b, t) reads row b * S + idx[b, t, k] of the flat [B * S, J] key table."""
    b = pl.program_id(0)

    def locate(k):
        return 0, b * seq_len + safe_row(idx_smem[0, k], seq_len)

    return locate


def _scores(q, w, rows):
    """Head logits [I, block_k] and z [1, block_k] = sum_i w[i] ReLU(logits[i]), f32."""
    logits = _dot(q, rows, _NT)
    return logits, jnp.sum(w * jnp.maximum(logits, 0.0), axis=0, keepdims=True)


def _forward_kernel(idx_smem, idx_ref, tgt_ref, q_ref, w_ref, k_hbm, kl_ref, lse_ref, z_scratch, buf, sems, *,
                    seq_len):
    num_chunks = idx_ref.shape[0]
    q, w = q_ref[...], w_ref[...]

    def body(c, rows, carry):
        top, total, mass = carry
        valid = idx_ref[c] >= 0
        logits = jnp.where(valid, _scores(q, w, rows)[1], _MASKED)
        z_scratch[c] = logits
        new_top = jnp.maximum(top, logits.max(axis=-1, keepdims=True))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top), axis=-1, keepdims=True)
        mass = mass + jnp.sum(jnp.where(valid, tgt_ref[c], 0.0), axis=-1, keepdims=True)
        return new_top, total, mass

    column = jnp.zeros((1, 1), F32)
    top, total, mass = stream_rows((k_hbm,), _row_locator(idx_smem, seq_len), buf, sems, num_chunks, body,
                                   (column - jnp.inf, column, column))
    lse = top + jnp.log(total)
    norm = jnp.maximum(mass, 1e-30)

    def kl_chunk(c, acc):
        p = jnp.where(idx_ref[c] >= 0, tgt_ref[c], 0.0) / norm
        log_p = jnp.log(jnp.where(p > 0, p, 1.0))
        kl = jnp.where(p > 0, p * (log_p - (z_scratch[c] - lse)), 0.0)
        return acc + jnp.sum(kl, axis=-1, keepdims=True)

    kl_ref[...] = jax.lax.fori_loop(0, num_chunks, kl_chunk, column)
    lse_ref[...] = lse


def _forward_call(q, k, w, idx, target, block_k):
    """q [B, T, I, J], k [B, S, J], w [B, T, I, 1] f32, idx and target [B, T, Kp] -> kl, lse [B, T]."""
    (B, T, I, J), S, Kp = q.shape, k.shape[1], idx.shape[-1]
    kl, lse = pl.pallas_call(
        functools.partial(_forward_kernel, seq_len=S),
        grid=(B, T),
        in_specs=[*_slot_specs(Kp, block_k), _per_query(I, J), _per_query(I, 1),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[_per_query(1, 1), _per_query(1, 1)],
        out_shape=[jax.ShapeDtypeStruct((B, T, 1, 1), F32)] * 2,
        scratch_shapes=[pltpu.VMEM((Kp // block_k, 1, block_k), F32),
                        *double_buffer_shapes(block_k, J, k.dtype)],
        compiler_params=mosaic_params("parallel", "parallel"),
        interpret=tpu_interpret(),
    )(*_slot_args(idx, target, block_k), q, w, k.reshape(B * S, J))
    return kl[..., 0, 0], lse[..., 0, 0]


def _backward_kernel(idx_smem, scalars, idx_ref, tgt_ref, q_ref, w_ref, k_hbm, dq_ref, dw_ref, dslot_ref, buf,
                     sems, *, seq_len):
    """scalars SMEM [1, 4]: (lse, g P, g / mass, unused) of this query."""
    num_chunks = idx_ref.shape[0]
    lse, soft_scale, target_scale = scalars[0, 0], scalars[0, 1], scalars[0, 2]
    q, w = q_ref[...], w_ref[...]
    q32 = q.astype(F32)

    def body(c, rows, carry):
        d_q, d_w = carry
        logits, z = _scores(q, w, rows)
        valid = idx_ref[c] >= 0
        dz = jnp.where(valid, soft_scale * jnp.exp(z - lse) - target_scale * tgt_ref[c], 0.0)  # [1, block_k]
        through_relu = jnp.where(logits > 0, w * dz, 0.0)  # [I, block_k]
        dslot_ref[c] = _dot(through_relu, q32, _TN)
        d_w = d_w + jnp.sum(jnp.maximum(logits, 0.0) * dz, axis=-1, keepdims=True)
        return d_q + _dot(through_relu, rows.astype(F32), _NN), d_w

    init = (jnp.zeros(q.shape, F32), jnp.zeros(w.shape, F32))
    d_q, d_w = stream_rows((k_hbm,), _row_locator(idx_smem, seq_len), buf, sems, num_chunks, body, init)
    dq_ref[...], dw_ref[...] = d_q, d_w


def _backward_call(q, k, w, idx, target, scalars, block_k):
    """One query chunk: q [B, Tc, I, J], w [B, Tc, I, 1], idx and target [B, Tc, Kp], scalars [B, Tc, 1, 4]
    -> dq [B, Tc, I, J], dw [B, Tc, I, 1], slot gradients [B, Tc, Kp, J], f32."""
    (B, Tc, I, J), S, Kp = q.shape, k.shape[1], idx.shape[-1]
    nc = Kp // block_k
    smem_scalars = pl.BlockSpec((None, None, 1, 4), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM)
    idx_smem, idx_vmem, tgt = _slot_args(idx, target, block_k)
    specs = _slot_specs(Kp, block_k)
    dq, dw, dslot = pl.pallas_call(
        functools.partial(_backward_kernel, seq_len=S),
        grid=(B, Tc),
        in_specs=[specs[0], smem_scalars, *specs[1:], _per_query(I, J), _per_query(I, 1),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[_per_query(I, J), _per_query(I, 1), _per_query(nc, block_k, J)],
        out_shape=[jax.ShapeDtypeStruct(s, F32)
                   for s in [(B, Tc, I, J), (B, Tc, I, 1), (B, Tc, nc, block_k, J)]],
        scratch_shapes=double_buffer_shapes(block_k, J, k.dtype),
        compiler_params=mosaic_params("parallel", "parallel"),
        interpret=tpu_interpret(),
    )(idx_smem, scalars, idx_vmem, tgt, q, w, k.reshape(B * S, J))
    return dq, dw, dslot.reshape(B, Tc, Kp, J)


# ---------------------------------------------------------------- custom VJP (as indexer_kl._kl_rows_pallas)


def _prepare(q, k, w, idx, target, block_k):
    """One operand type for the MXU, w as [.., I, 1] f32 columns, K padded to whole chunks (-1, target 0)."""
    if q.dtype != k.dtype:
        q, k = q.astype(F32), k.astype(F32)
    pad_k = -idx.shape[-1] % block_k
    return q, k, w.astype(F32)[..., None], _pad(idx, 2, pad_k, -1), _pad(target, 2, pad_k, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kl_rows(q, k, w, idx, target, block_q: int, block_k: int):
    return _forward_call(*_prepare(q, k, w, idx, target, block_k), block_k)[0]


def _kl_rows_fwd(q, k, w, idx, target, block_q, block_k):
    kl, lse = _forward_call(*_prepare(q, k, w, idx, target, block_k), block_k)
    return kl, (q, k, w, idx, target, lse)


def _kl_rows_bwd(block_q, block_k, residuals, g):
    q, k, w, idx, target, lse = residuals
    # dz = g (P softmax(z) - target / mass): P = 1 when the row has target mass, else 0 (the KL is then 0).
    mass = jnp.sum(jnp.where(idx >= 0, target, 0.0), axis=-1)
    norm = jnp.maximum(mass, 1e-30)
    scalars = jnp.stack([lse, g * (mass / norm), g / norm, jnp.zeros_like(lse)], axis=-1)[:, :, None]
    q_k, k_k, w_k, idx_k, tgt_k = _prepare(q, k, w, idx, target, block_k)

    def step(acc, xs):
        q_c, w_c, idx_c, tgt_c, scalars_c = xs
        dq, dw, dslot = _backward_call(q_c, k_k, w_c, idx_c, tgt_c, scalars_c, block_k)
        return _scatter_add_slots(acc, idx_c, dslot), (dq, dw)

    xs = tuple(_to_chunks(x, block_q) for x in (q_k, w_k, idx_k, tgt_k, scalars))
    dk, (dq, dw) = jax.lax.scan(step, jnp.zeros(k.shape, F32), xs)
    dq, dw = _from_chunks(dq), _from_chunks(dw)[..., 0]
    return dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), None, None


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd)


def tpu_kl_rows(q, k, w, idx, target, block_q: int, block_k: int = 128):
    """`indexer_kl._kl_rows_pallas` as Mosaic kernels: q [B, T, I, J], k [B, S, J], w [B, T, I], idx int32
    [B, T, K] (-1 or a key of [0, S)), target f32 [B, T, K] -> kl f32 [B, T], differentiable in q, k and w.
    T must be a multiple of block_q (queries per backward chunk); block_k: slots per DMA chunk (a power of
    two >= 8, capped at K rounded up)."""
    if q.shape[1] % block_q:
        raise ValueError(f"T = {q.shape[1]} must be a multiple of block_q = {block_q}")
    return _kl_rows(q, k, w, idx, target, block_q, _slot_block(block_k, idx.shape[-1]))


__all__ = ["tpu_kl_rows"]
