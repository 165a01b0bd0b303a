"""Absorbed sparse-MLA math over one chunk of gathered latent rows, in the form Mosaic lowers
(docs/architecture.md#sparse-attention).

The same online softmax as `sparse_mla._online_softmax`, with three TPU-shaped choices:
- a row is c_kv | k_rope in one [width = R + Hr] vector and the query is q_lat | q_rope, so the score is one
  MXU matmul over the whole width (no lane slice at R inside the kernel); the output accumulates over the
  whole width too and the caller drops the last Hr columns outside the kernel;
- per-head statistics are [N, 1] columns, never 1-D vectors (Mosaic's vregs are 2-D);
- slot validity is a [1, block] lane vector read from a VMEM copy of the indices.

Matmuls take bf16 (or the rows' dtype) operands with f32 accumulation, as the Triton kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity", as in sparse_mla: a chunk with no valid slot keeps the running max finite.
NEG = -1e30
F32 = jnp.float32

_NT = (((1,), (1,)), ((), ()))  # a[M, C] . b[K, C] -> [M, K]
_NN = (((1,), (0,)), ((), ()))  # a[M, C] . b[C, K] -> [M, K]
_TN = (((0,), (0,)), ((), ()))  # a[C, M] . b[C, K] -> [M, K]


def dot(a, b, dims):
    """MXU matmul with `a` cast to `b`'s dtype (one operand type) and f32 accumulation."""
    return jax.lax.dot_general(a.astype(b.dtype), b, dims, preferred_element_type=F32)


def valid_slots(idx, num_rows):
    """Slots that name a row: -1 and out-of-range indices select nothing (as in sparse_mla._valid)."""
    return (idx >= 0) & (idx < num_rows)


def scores(q, rows, valid, scale):
    """s [N, block] f32 = scale * q [N, W] . rows [block, W], NEG at invalid slots (valid [1, block])."""
    return jnp.where(valid, dot(q, rows, _NT) * scale, NEG)


def init_state(num_heads: int, width: int):
    """Online-softmax state: running max m [N, 1], running sum l [N, 1], accumulator acc [N, W], all f32."""
    column = jnp.zeros((num_heads, 1), F32)
    return column + NEG, column, jnp.zeros((num_heads, width), F32)


def online_update(state, s, valid, rows):
    """Fold one chunk's scores s [N, block] and rows [block, W] into the state."""
    m, l, acc = state
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    return m_new, alpha * l + p.sum(axis=-1, keepdims=True), alpha * acc + dot(p, rows, _NN)


def finish(state):
    """(o [N, W] = acc / l, lse [N, 1] = m + log l); a query with no valid slot (l = 0) gets o = 0 and
    lse = +inf, so its recomputed probabilities are 0."""
    m, l, acc = state
    l_safe = jnp.where(l > 0, l, 1.0)
    return jnp.where(l > 0, acc / l_safe, 0.0), jnp.where(l > 0, m + jnp.log(l_safe), jnp.inf)


def probs_from_lse(s, valid, lse):
    """p [N, block] = exp(s - lse) at valid slots, 0 elsewhere."""
    return jnp.where(valid, jnp.exp(s - lse), 0.0)


def slot_grads(p, rows, q, d_o, delta, g_probs, scale):
    """Softmax backward over one chunk (as `sparse_mla._slots_backward`, full width): (dq [N, W], per-slot
    d_rows [block, W]), f32.

    dp[n, k] = do[n] . c_kv[k] (+ g_probs[k] / N when probs is an output), ds = p * (dp - delta); d_o is
    [N, W] with zeros in the k_rope columns, so do . row is the c_kv part only.
    """
    dp = dot(d_o, rows.astype(F32), _NT)
    if g_probs is not None:
        dp = dp + g_probs / p.shape[0]
    ds = p * (dp - delta)
    d_q = scale * dot(ds, rows.astype(F32), _NN)
    d_rows = scale * dot(ds, q.astype(F32), _TN) + dot(p, d_o, _TN)
    return d_q, d_rows


__all__ = [
    "F32", "NEG", "dot", "finish", "init_state", "online_update", "probs_from_lse", "scores", "slot_grads",
    "valid_slots",
]
