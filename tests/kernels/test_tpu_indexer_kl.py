"""Sparse indexer KL, Mosaic kernels (pallas_kernels/tpu_indexer_kl.py), through
`sparse_indexer_kl(impl="pallas")` on a simulated TPU: forward and backward lower for TPU, and under the TPU
interpreter the loss and the gradients for q, k and w equal the dense oracle of test_indexer_kl.py (SI
top-k indices with empty rows, random rows with holes, zero-mass targets and a query mask in bf16), with
slots in several DMA chunks and queries in several backward chunks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.gpu_cases import kernel_cases
from longcat_jax.config import Config
from pallas_kernels import impl, indexer_kl, tpu_indexer_kl
from pallas_kernels.indexer_kl import sparse_indexer_kl
from tests.kernels.test_indexer_kl import assert_close, dense_loss_and_grads, make_case
from tests.kernels.tpu_cases import TPU_CALL, lower_for_tpu


# Own jit (not test_indexer_kl's): a jit's cache does not see the `interpreting` context.
@jax.jit
def tpu_loss_and_grads(q, k, w, idx, target, qmask):
    with impl.interpreting("tpu"):
        fn = functools.partial(sparse_indexer_kl, impl="pallas", query_block=16)
        return jax.value_and_grad(fn, argnums=(0, 1, 2))(q, k, w, idx, target, qmask)


@pytest.fixture
def chunks_of_8_slots(monkeypatch):
    """K = 16 slots in DMA chunks of 8 (both row buffers in use); records that the Mosaic path ran."""
    calls, kernel = [], tpu_indexer_kl.tpu_kl_rows
    monkeypatch.setattr(tpu_indexer_kl, "tpu_kl_rows",
                        lambda *a: calls.append(a) or kernel(*a, block_k=8))
    return calls


def check(case, rtol_value, rtol_grad, calls):
    q, k, w, qp, kp, kv, idx, target, qmask = case
    want, want_grads = dense_loss_and_grads(q, k, w, qp, kp, kv, idx, target, qmask)
    got, grads = tpu_loss_and_grads(q, k, w, idx, target, qmask)
    assert calls, "sparse_indexer_kl(impl='pallas') on TPU must run the Mosaic kernels"
    assert float(want) > 0.1  # a loss that could be wrong
    assert_close(got, want, rtol_value, "value")
    for g, r, arg in zip(grads, want_grads, "qkw"):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert_close(g, r, rtol_grad, f"d{arg}")
    return grads


def test_forward_and_backward_lower_for_tpu_at_small_preset_shapes():
    fn, args, _ = kernel_cases(Config.small(), T=256)["indexer_kl_fwd_bwd"]
    assert lower_for_tpu(fn, args).count(TPU_CALL) == 2  # the forward, the backward (in the query-chunk scan)


def test_the_triton_kernels_do_not_lower_for_tpu(monkeypatch):
    """The lowering check has teeth: routed to the Triton kernels (rows gathered by a vector index), the same
    call does not lower for TPU."""
    fn, args, _ = kernel_cases(Config.small(), T=64)["indexer_kl_fwd_bwd"]
    monkeypatch.setattr(indexer_kl, "backend", lambda: "triton")
    with pytest.raises(ValueError, match="int indexing"):
        lower_for_tpu(fn, args)


def test_si_topk_indices_with_empty_rows(chunks_of_8_slots):
    """T = 37 queries in backward chunks of 16 (padded to 48); five queries of row 1 with no slot at all:
    KL 0 and exactly zero dq, dw there."""
    q, k, w, qp, kp, kv, idx, target, qmask = make_case("token_topk")
    idx = idx.at[1, :5].set(-1)
    dq, _, dw = check((q, k, w, qp, kp, kv, idx, target, qmask), 1e-5, 2e-5, chunks_of_8_slots)
    assert not np.asarray(dq[1, :5]).any() and not np.asarray(dw[1, :5]).any()
    assert np.asarray(dq[1, 5:]).any()


def test_random_rows_with_holes_bf16(chunks_of_8_slots):
    """Random slots with -1 holes, all-empty rows, zero-mass targets and a query mask; bf16 q, k, w (math in
    f32, only the returned gradients rounded)."""
    check(make_case("random_masked", jnp.bfloat16), 1e-4, 1e-2, chunks_of_8_slots)
