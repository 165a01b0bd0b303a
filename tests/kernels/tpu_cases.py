"""Shared pieces of the TPU kernel tests (tests/kernels/test_tpu_*.py): lowering for TPU on this CPU, and the
GPU kernels' tiny cases, reused so that both kernel families are held to the same inputs.

`lower_for_tpu` builds the kernels compiled (`impl.lowering_for("tpu")`) and runs Pallas' Mosaic lowering
(`lowering_platforms=("tpu",)`), which raises on a block that breaks Mosaic's tiling rule or an operation
Mosaic has no rule for. Compiling the Mosaic module to TPU code happens only on a TPU.

Running a TPU kernel on CPU needs nothing: off a TPU, `impl.tpu_interpret()` hands Pallas the TPU
interpreter's parameters, which simulate VMEM, SMEM, DMAs and semaphores, raise on an out-of-bounds DMA and
fill uninitialised memory with NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import impl
from tests.kernels.test_sparse_mla import (  # noqa: F401  (re-exported for the TPU tests)
    assert_close,
    causal_indices,
    inputs,
    normal,
    outputs_and_grads,
    probe_loss,
    si_indices,
)

TPU_CALL = "tpu_custom_call"


def lower_for_tpu(fn, args) -> str:
    """StableHLO text of jit(fn)(*args) lowered for TPU with compiled (not interpreted) Mosaic kernels."""
    with impl.lowering_for("tpu"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def paged_case(rng, B, N, R, Hr, page_size, pages_per_seq, num_pages, K, lengths, dtype=jnp.float32):
    """A decode step over a shuffled page table: (q_lat, q_rope, kv_pages, page_table, indices) with distinct
    positions below each sequence's length, the first and the last position, and an empty slot."""
    q_lat, q_rope, kv_pages = normal(rng, (B, N, R), (B, N, Hr), (num_pages, page_size, R + Hr), dtype=dtype)
    page_table = rng.permutation(num_pages)[: B * pages_per_seq].reshape(B, pages_per_seq)
    idx = np.full((B, K), -1, np.int32)
    for b, length in enumerate(lengths):
        picks = rng.permutation(np.arange(1, length - 1))[: K - 3]
        idx[b, : len(picks)] = picks
        idx[b, -2:] = [0, length - 1]  # slot K - 3 (and any short row's tail) stays empty
    return q_lat, q_rope, kv_pages, jnp.asarray(page_table, jnp.int32), jnp.asarray(idx)


def paged_reference(q_lat, q_rope, kv_pages, page_table, idx, scale, new_rows=None, new_pos=None):
    """`sparse_mla_reference` in f32 over the pages laid out as linear rows (the new row written in)."""
    from pallas_kernels.sparse_mla import sparse_mla_reference

    B, R = q_lat.shape[0], q_lat.shape[-1]
    page_size, D = kv_pages.shape[1:]
    linear = kv_pages[page_table].reshape(B, -1, D).astype(jnp.float32)
    if new_rows is not None:
        linear = linear.at[jnp.arange(B), new_pos].set(new_rows.astype(jnp.float32))
    q_lat, q_rope = q_lat[:, None].astype(jnp.float32), q_rope[:, None].astype(jnp.float32)
    o_lat, _ = sparse_mla_reference(q_lat, q_rope, linear[..., :R], linear[..., R:], idx[:, None], scale)
    return o_lat[:, 0]
