"""Sparse MLA forward and backward, Mosaic kernels (pallas_kernels/tpu_sparse_mla.py): they lower for TPU,
and under the TPU interpreter outputs, per-slot probabilities and all four gradients equal the dense masked
reference on the GPU kernels' cases (-1 slots, an empty row, bf16, the SI band with packed documents)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bench.gpu_cases import kernel_cases
from longcat_jax.config import Config
from pallas_kernels import impl
from pallas_kernels import sparse_mla as sparse_mla_module
from pallas_kernels import tpu_sparse_mla as tpu_sparse_mla_module
from pallas_kernels.sparse_mla import sparse_mla, sparse_mla_reference
from pallas_kernels.tpu_sparse_mla import tpu_sparse_mla
from tests.kernels.tpu_cases import (
    TPU_CALL,
    assert_close,
    causal_indices,
    inputs,
    lower_for_tpu,
    outputs_and_grads,
    si_indices,
)

CFG = Config.tiny()  # N=4, R=16, Hr=8


def check_against_reference(fast, args, idx, scale, tol, grad_tol):
    f32_args = [a.astype(jnp.float32) for a in args]
    (o, probs), grads = outputs_and_grads(fast, args)
    reference = outputs_and_grads(lambda *a: sparse_mla_reference(*a, idx, scale), f32_args)
    (o_ref, probs_ref), grads_ref = reference
    assert o.dtype == args[0].dtype and probs.shape == idx.shape
    assert_close(o, o_ref, tol)
    assert_close(probs, probs_ref, tol)
    assert np.all(np.asarray(probs)[np.asarray(idx) < 0] == 0)
    for g, g_ref, a in zip(grads, grads_ref, args):
        assert g.dtype == a.dtype and np.all(np.isfinite(np.asarray(g, np.float32)))
        assert_close(g, g_ref, grad_tol)
    return o, probs, grads


def edge_case_indices(B, T, S, K):
    """The GPU test's edge cases: K > S (most slots -1), a query with no key, a single key, an index = S
    (dropped), the first and the last key."""
    idx = causal_indices(np.random.default_rng(5), B, T, S, K, empty_share=0.1)
    idx[1, 2] = -1
    idx[0, 4] = -1
    idx[0, 4, 5:7] = [S - 1, 0]
    idx[0, 3] = -1
    idx[0, 3, -1] = 0
    idx[1, 4, 0] = S
    return jnp.asarray(idx)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_probs_grads_with_edge_cases(dtype):
    """K = 20 slots in chunks of 8: three chunks, so both DMA buffers are refilled while the other is read;
    T = 5 queries in backward chunks of 2 (one padded)."""
    B, T, S, K = 2, 5, 13, 20
    args = inputs(4, B, T, S, CFG.num_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim, dtype)
    idx = edge_case_indices(B, T, S, K)

    def fast(*a):
        return tpu_sparse_mla(*a, idx, 0.5, return_probs=True, block_q=2, block_k=8)

    tol, grad_tol = (1e-5, 1e-5) if dtype == jnp.float32 else (1e-2, 3e-2)
    o, probs, grads = check_against_reference(fast, args, idx, 0.5, tol, grad_tol)
    assert np.all(np.asarray(o[1, 2]) == 0) and np.all(np.asarray(grads[0][1, 2]) == 0)
    never_selected = np.setdiff1d(np.arange(S), np.asarray(idx[1]))
    assert np.all(np.asarray(grads[2][1, never_selected]) == 0)


def test_si_band_with_packed_documents_through_the_entry_point(monkeypatch):
    """`sparse_mla(impl="pallas")` on a (simulated) TPU runs the Mosaic kernels: the SI window slots (a
    document starts at key 8, so some window slots are -1) then earlier keys of the same document."""
    calls = []
    monkeypatch.setattr(tpu_sparse_mla_module, "tpu_sparse_mla",
                        lambda *a, **kw: calls.append(kw) or tpu_sparse_mla(*a, **kw))
    B, T, S, K, W = 1, 6, 12, 8, 4
    args = inputs(3, B, T, S, CFG.num_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim)
    idx = si_indices(np.random.default_rng(4), B, T, S, W, K, doc_start=8)
    assert (idx[..., :W] == -1).any() and (idx[..., W:] >= 0).any()
    idx = jnp.asarray(idx)

    def band(*a):
        return sparse_mla(*a, idx, CFG.softmax_scale, window=W, q_offset=S - T, impl="pallas",
                          return_probs=True, block_q=4)

    with impl.interpreting("tpu"):
        check_against_reference(band, args, idx, CFG.softmax_scale, 1e-5, 1e-5)
    assert calls and calls[0]["window"] == W


def test_forward_and_backward_lower_for_tpu_at_small_preset_shapes():
    fn, args, _ = kernel_cases(Config.small(), T=256)["sparse_mla_fwd_bwd"]
    text = lower_for_tpu(fn, args)
    assert text.count(TPU_CALL) == 2  # the forward kernel, the backward kernel (inside the query-chunk scan)


def test_a_block_that_breaks_mosaic_tiling_fails_to_lower(monkeypatch):
    """The lowering check has teeth: routed to the Triton kernels, whose per-query blocks ([K] indices as a
    1-row tile) break Mosaic's (8, 128) rule, the same call does not lower for TPU."""
    fn, args, _ = kernel_cases(Config.small(), T=64)["sparse_mla_fwd_bwd"]
    with monkeypatch.context() as patch:
        patch.setattr(sparse_mla_module, "backend", lambda: "triton")
        with pytest.raises(ValueError, match="divisible by 8 and 128"):
            lower_for_tpu(fn, args)
    assert lower_for_tpu(lambda *a: fn(*a), args).count(TPU_CALL) == 2  # a new function: no cached trace
