"""Memory-bounded sparse-stage indexer KL loss (docs/architecture.md#indexer-training),
without any [T, S] tensor.

In the sparse stage the indexer is distilled only over the selected set S_t (K keys per query):
    loss = mean_t KL( p_t || softmax(z_t) ),   z_t[k] = sum_i w[t,i] ReLU(q[t,i] . k[idx[t,k]])
with both distributions renormalised over the valid slots of S_t: p_t = target / sum(target) (the main
attention's head-mean probabilities at those slots, no gradient) and z_t the lightning-indexer scores
(docs/architecture.md#indexer). Only the K selected keys count, so scores are computed at the gathered key
rows only.

Reference: `longcat_jax.model.indexer_loss.indexer_kl`, the model's dense loss, composed as
    indexer_kl(indexer_scores(q, k, w, ...), target scattered to [B,T,S],
               indices_to_mask(indices, S) & causal, query_mask)
(`indexer_scores` and `indices_to_mask` from `longcat_jax.ops`); this equals it in value and in its
gradients for q, k and w. Indices must be valid keys of
their query or -1 (as every selector returns them) and distinct within a row; a slot outside [0, S) counts
as empty. An all-empty row contributes KL 0 and still counts in the mean (as in the dense loss).

Implementations (`impl`, see pallas_kernels/impl.py):
  "xla"     lax.map over query blocks, each under jax.checkpoint, differentiated by JAX: live memory is
            O(query_block * K * J) for the gathered rows, forward and backward. Its dk is XLA's scatter-add
            (the gather's transpose), deterministic only where the backend's scatter is.
  "pallas"  a forward kernel, one program per (batch row, query block): per query gather the K key rows,
            score them, log-softmax over the valid slots, KL; it also returns the log-normaliser.
            A jax.custom_vjp backward with two kernels:
              dq, dw  per (batch row, query block), recomputing the query's scores;
              dk      per (batch row, block of key_block keys): the (query, slot) entries are sorted by key
                      once (a stable sort, so equal keys stay in (query, slot) order) and each program walks
                      the entries of its key block in that order, adding them into a private f32 tile with
                      a fixed-shape one-hot matmul per chunk of entries. Every dk row is written by exactly
                      one program, in a fixed order, with no atomics, so dk has the same bits on every run.
            Residual memory: the inputs, one log-normaliser per query and the sort (T * K int32 per row).
Written for the Pallas Triton backend (refs gathered by index vectors, pl.ds windows, f32 dots); only run
here with interpret=True on CPU, GPU lowering is unverified. The dk walk is sequential per key block, so a
block that every query selects (the sinks) does up to S / K times the average block's work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.impl import backend, compiler_params, interpret, resolve
from pallas_kernels.tile_dot import tile_dot

_MASKED = -1e9  # the dense loss's masked logit: finite, so empty rows stay NaN-free
_ENTRY_CHUNK = 16  # (query, slot) entries the dk kernel handles per step


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_kl(z, valid, target):
    """KL(p || softmax(z)) over the valid slots of the last axis, and the log-normaliser; as `indexer_kl`."""
    logits = jnp.where(valid, z, _MASKED)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
    p = jnp.where(valid, target, 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - (logits - lse)), 0.0), axis=-1)
    return kl, lse[..., 0]


def _check(q, k, w, indices, target, query_mask):
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"want q [B,T,I,J], k [B,S,J], w [B,T,I], indices [B,T,K]; got "
                         f"{q.shape}, {k.shape}, {w.shape}, {indices.shape}")
    B, T, I, J = q.shape
    if k.shape[0] != B or k.shape[2] != J or w.shape != (B, T, I) or indices.shape[:2] != (B, T):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, w {w.shape}, indices {indices.shape}")
    if target.shape != indices.shape:
        raise ValueError(f"target {target.shape} must match indices {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if query_mask is not None and query_mask.shape != (B, T):
        raise ValueError(f"query_mask must be [B,T]={B, T}, got {query_mask.shape}")


def sparse_indexer_kl(q, k, w, indices, target, query_mask=None, *, impl: str = "auto", query_block: int = 64,
                      key_block: int = 64):
    """Mean over queries of KL(target || softmax(indexer scores)) on the selected slots; a scalar f32.

    q [B,T,I,J], k [B,S,J], w [B,T,I] (the indexer's detached-input projections), indices int [B,T,K]
    (-1 empty), target [B,T,K] main-attention probabilities at those slots (gets no gradient), query_mask
    [B,T] (1 = the query counts) or None. query_block / key_block: queries per program or map step, keys per
    dk program (rounded to powers of two).
    """
    impl = resolve(impl)
    _check(q, k, w, indices, target, query_mask)
    if query_block < 1 or key_block < 1:
        raise ValueError(f"query_block and key_block must be positive, got {query_block}, {key_block}")
    B, T = indices.shape[:2]
    S = k.shape[1]
    bq = min(pl.next_power_of_2(query_block), pl.next_power_of_2(T))
    t_pad = _cdiv(T, bq) * bq - T
    # Padded queries have only empty slots: KL 0 and no gradient; they are cut off before the mean.
    idx = jnp.where((indices >= 0) & (indices < S), indices, -1).astype(jnp.int32)
    idx = jnp.pad(idx, ((0, 0), (0, t_pad), (0, 0)), constant_values=-1)
    tgt = jnp.pad(jax.lax.stop_gradient(target).astype(jnp.float32), ((0, 0), (0, t_pad), (0, 0)))
    qp = jnp.pad(q, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    wp = jnp.pad(w, ((0, 0), (0, t_pad), (0, 0)))
    if impl == "pallas" and backend() == "mosaic":  # TPU: the Mosaic kernels (they import helpers from here)
        from pallas_kernels.tpu_indexer_kl import tpu_kl_rows

        kl = tpu_kl_rows(qp, k, wp, idx, tgt, bq)
    elif impl == "pallas":
        bk = min(pl.next_power_of_2(key_block), pl.next_power_of_2(S))
        kl = _kl_rows_pallas(qp, k, wp, idx, tgt, bq, bk)
    else:
        kl = _kl_rows_xla(qp, k, wp, idx, tgt, bq)
    kl = kl[:, :T]
    if query_mask is None:
        return kl.mean()
    weight = query_mask.astype(jnp.float32)
    return (kl * weight).sum() / jnp.maximum(weight.sum(), 1.0)


# --- "xla": chunked plain JAX ------------------------------------------------------------------------------


def _gather_rows(k, idx):
    """k [B,S,J], idx [B,Tq,K] (-1 allowed) -> f32 rows [B,Tq,K,J]; empty slots read row 0 (masked later).

    k is cast before the gather, so the gather's transpose (a scatter-add of every slot's dk) sums in f32:
    in bf16 a key read by many queries lost ~6% of its gradient (bench/gpu_kernels.py parity)."""
    return jax.vmap(lambda kb, ib: kb[ib])(k.astype(jnp.float32), jnp.maximum(idx, 0))


def _kl_rows_xla(q, k, w, idx, target, bq: int):
    B, T = idx.shape[:2]

    @jax.checkpoint  # keep only the block's inputs for the backward: O(bq * K * J) live, not O(T * K * J)
    def one_block(qb, wb, ib, tb):
        rows = _gather_rows(k, ib)
        logits = jnp.einsum("btij,btkj->btik", qb.astype(jnp.float32), rows)
        z = jnp.einsum("bti,btik->btk", wb.astype(jnp.float32), jax.nn.relu(logits))
        return _row_kl(z, ib >= 0, tb)[0]

    split = lambda x: x.reshape(B, T // bq, bq, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    kl = jax.lax.map(lambda a: one_block(*a), (split(q), split(w), split(idx), split(target)))
    return kl.swapaxes(0, 1).reshape(B, T)


# --- "pallas": kernels with a custom VJP -----------------------------------------------------------------


def _query_slots(q_t, w_t, idx_t, k_ref):
    """One query: gathered rows [K,J], head logits [I,K], scores z [K], valid slots [K]."""
    valid = idx_t >= 0
    rows = k_ref[jnp.where(valid, idx_t, 0), :].astype(jnp.float32)
    logits = tile_dot(q_t.astype(jnp.float32), rows, 1, 1)
    z = jnp.sum(w_t.astype(jnp.float32)[:, None] * jnp.maximum(logits, 0.0), axis=0)
    return rows, logits, z, valid


def _forward_kernel(q_ref, w_ref, idx_ref, tgt_ref, k_ref, kl_ref, lse_ref):
    bq = kl_ref.shape[0]
    lane = jax.lax.broadcasted_iota(jnp.int32, (bq,), 0)

    def one_query(t, acc):
        kl_acc, lse_acc = acc
        _, _, z, valid = _query_slots(q_ref[t], w_ref[t], idx_ref[t], k_ref)
        kl, lse = _row_kl(z, valid, tgt_ref[t])
        return jnp.where(lane == t, kl, kl_acc), jnp.where(lane == t, lse, lse_acc)

    zeros = jnp.zeros((bq,), jnp.float32)
    kl_ref[...], lse_ref[...] = jax.lax.fori_loop(0, bq, one_query, (zeros, zeros))


def _slot_grad(z, valid, target, lse, soft_scale, target_scale):
    """d loss / d z over the slots: g * (P * softmax(z) - p) = soft_scale * e^(z - lse) - target_scale * t.

    soft_scale = g * P (P = 1 when the row has target mass, else 0), target_scale = g / target mass.
    """
    return jnp.where(valid, soft_scale * jnp.exp(z - lse) - target_scale * target, 0.0)


def _dq_dw_kernel(q_ref, w_ref, idx_ref, tgt_ref, lse_ref, soft_ref, tscale_ref, k_ref, dq_ref, dw_ref):
    bq = dw_ref.shape[0]

    def one_query(t, carry):
        w_t = w_ref[t].astype(jnp.float32)
        rows, logits, z, valid = _query_slots(q_ref[t], w_t, idx_ref[t], k_ref)
        dz = _slot_grad(z, valid, tgt_ref[t], lse_ref[t], soft_ref[t], tscale_ref[t])  # [K]
        dw_ref[t] = jnp.sum(jnp.maximum(logits, 0.0) * dz[None, :], axis=1)
        through_relu = jnp.where(logits > 0, w_t[:, None] * dz[None, :], 0.0)  # [I, K]
        dq_ref[t] = tile_dot(through_relu, rows, 1, 0)
        return carry

    jax.lax.fori_loop(0, bq, one_query, 0)


def _dk_kernel(start_ref, order_ref, key_ref, q_ref, w_ref, tgt_ref, lse_ref, soft_ref, tscale_ref, k_ref,
               dk_ref, *, num_slots: int):
    """dk for one key block: walk its (query, slot) entries in sorted order, a chunk of entries at a time."""
    kb = pl.program_id(1)
    bk, J = dk_ref.shape
    n_heads = q_ref.shape[1]
    begin, end = start_ref[kb], start_ref[kb + 1]
    ent = jax.lax.broadcasted_iota(jnp.int32, (_ENTRY_CHUNK,), 0)
    row_ids = jax.lax.broadcasted_iota(jnp.int32, (_ENTRY_CHUNK, bk), 1)

    def one_chunk(c, acc):
        first = begin + c * _ENTRY_CHUNK
        live = first + ent < end
        flat = order_ref[pl.ds(first, _ENTRY_CHUNK)]  # t * K + slot, valid for every lane (padded arrays)
        t = flat // num_slots
        local = jnp.where(live, key_ref[pl.ds(first, _ENTRY_CHUNK)] - kb * bk, 0)
        krow = k_ref[local, :].astype(jnp.float32)  # [E, J]
        w_e = [w_ref[t, i].astype(jnp.float32) for i in range(n_heads)]  # I x [E]
        q_heads = [q_ref[t, i, :].astype(jnp.float32) for i in range(n_heads)]  # I x [E, J]
        logits = [jnp.sum(qi * krow, axis=1) for qi in q_heads]
        z = sum(w_e[i] * jnp.maximum(logits[i], 0.0) for i in range(n_heads))
        dz = _slot_grad(z, live, tgt_ref[flat], lse_ref[t], soft_ref[t], tscale_ref[t])  # [E]
        contrib = jnp.zeros((_ENTRY_CHUNK, J), jnp.float32)
        for i in range(n_heads):
            contrib = contrib + jnp.where(logits[i] > 0, w_e[i] * dz, 0.0)[:, None] * q_heads[i]
        onehot = (row_ids == local[:, None]).astype(jnp.float32)  # [E, bk]; dead lanes have dz = 0
        return acc + tile_dot(onehot, contrib, 0, 0)

    n_chunks = (end - begin + _ENTRY_CHUNK - 1) // _ENTRY_CHUNK
    dk_ref[...] = jax.lax.fori_loop(0, n_chunks, one_chunk, jnp.zeros((bk, J), jnp.float32))


def _specs(bq: int, I: int, J: int, K: int, S: int):
    """BlockSpecs of a per-(batch row, query block) kernel: q, w, idx, target blocks and the whole key row."""
    return dict(
        q=pl.BlockSpec((None, bq, I, J), lambda b, i: (b, i, 0, 0)),
        w=pl.BlockSpec((None, bq, I), lambda b, i: (b, i, 0)),
        slots=pl.BlockSpec((None, bq, K), lambda b, i: (b, i, 0)),
        per_query=pl.BlockSpec((None, bq), lambda b, i: (b, i)),
        k=pl.BlockSpec((None, S, J), lambda b, i: (b, 0, 0)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kl_rows_pallas(q, k, w, idx, target, bq: int, bk: int):
    return _kl_forward(q, k, w, idx, target, bq)[0]


def _kl_forward(q, k, w, idx, target, bq: int):
    B, T, I, J = q.shape
    S, K = k.shape[1], idx.shape[2]
    sp = _specs(bq, I, J, K, S)
    row = jax.ShapeDtypeStruct((B, T), jnp.float32)
    return pl.pallas_call(
        _forward_kernel, out_shape=(row, row), grid=(B, T // bq),
        in_specs=[sp["q"], sp["w"], sp["slots"], sp["slots"], sp["k"]],
        out_specs=(sp["per_query"], sp["per_query"]),
        compiler_params=compiler_params(), interpret=interpret(),
    )(q, w, idx, target, k)


def _kl_rows_fwd(q, k, w, idx, target, bq: int, bk: int):
    kl, lse = _kl_forward(q, k, w, idx, target, bq)
    return kl, (q, k, w, idx, target, lse)


def _kl_rows_bwd(bq: int, bk: int, res, g):
    q, k, w, idx, target, lse = res
    B, T, I, J = q.shape
    S, K = k.shape[1], idx.shape[2]
    mass = jnp.sum(jnp.where(idx >= 0, target, 0.0), axis=-1)
    norm = jnp.maximum(mass, 1e-30)
    soft_scale, target_scale = g * (mass / norm), g / norm
    sp = _specs(bq, I, J, K, S)
    dq, dw = pl.pallas_call(
        _dq_dw_kernel,
        out_shape=(jax.ShapeDtypeStruct((B, T, I, J), jnp.float32),
                   jax.ShapeDtypeStruct((B, T, I), jnp.float32)),
        grid=(B, T // bq),
        in_specs=[sp["q"], sp["w"], sp["slots"], sp["slots"], *[sp["per_query"]] * 3, sp["k"]],
        out_specs=(sp["q"], sp["w"]),
        compiler_params=compiler_params(), interpret=interpret(),
    )(q, w, idx, target, lse, soft_scale, target_scale, k)
    dk = _dk(q, k, w, idx, target, lse, soft_scale, target_scale, bk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), None, None


def _dk(q, k, w, idx, target, lse, soft_scale, target_scale, bk: int):
    """dk [B,S,J] by key block from the (query, slot) entries sorted by key (see the module docstring)."""
    B, T, I, J = q.shape
    S, K = k.shape[1], idx.shape[2]
    nkb = _cdiv(S, bk)
    s_pad = nkb * bk
    keys = jnp.where(idx >= 0, idx, s_pad).reshape(B, T * K)  # empty slots sort past every key block
    order = jnp.argsort(keys, axis=-1, stable=True).astype(jnp.int32)
    sorted_keys = jnp.take_along_axis(keys, order, axis=-1)
    bounds = jnp.arange(nkb + 1, dtype=jnp.int32) * bk
    starts = jax.vmap(lambda sk: jnp.searchsorted(sk, bounds, side="left"))(sorted_keys).astype(jnp.int32)
    # Pad the entry arrays by one chunk so every pl.ds window is in bounds; padded lanes are not live.
    order = jnp.pad(order, ((0, 0), (0, _ENTRY_CHUNK)))
    sorted_keys = jnp.pad(sorted_keys, ((0, 0), (0, _ENTRY_CHUNK)))
    n_ent = T * K + _ENTRY_CHUNK
    whole = lambda *shape: pl.BlockSpec((None, *shape), lambda b, j: (b,) + (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_dk_kernel, num_slots=K)
    dk = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, s_pad, J), jnp.float32),
        grid=(B, nkb),
        in_specs=[whole(nkb + 1), whole(n_ent), whole(n_ent), whole(T, I, J), whole(T, I), whole(T * K),
                  whole(T), whole(T), whole(T), pl.BlockSpec((None, bk, J), lambda b, j: (b, j, 0))],
        out_specs=pl.BlockSpec((None, bk, J), lambda b, j: (b, j, 0)),
        compiler_params=compiler_params(), interpret=interpret(),
    )(starts, order, sorted_keys, q, w, target.reshape(B, T * K), lse, soft_scale, target_scale,
      jnp.pad(k, ((0, 0), (0, s_pad - S), (0, 0))))
    return dk[:, :S]


_kl_rows_pallas.defvjp(_kl_rows_fwd, _kl_rows_bwd)

__all__ = ["sparse_indexer_kl"]
