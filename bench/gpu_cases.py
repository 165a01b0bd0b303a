"""Every kernel entry point, forward and backward, on random inputs at a config's tile sizes.

One table for the checks that need a GPU's compiler or a GPU: `tests/kernels/test_lowering.py` lowers each
case for Triton on CPU, `bench/triton_ptx.py` compiles the Triton IR to PTX, `bench/gpu_kernels.py` runs and
times them on a device against the XLA path. Each case is (fn, args, number of pallas_calls in fn); with
impl="pallas" (the default), under `impl.lowering_for` or on a GPU, fn runs the compiled kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longcat_jax.config import Config
from pallas_kernels.indexer_blocks import select_blocks
from pallas_kernels.indexer_kl import sparse_indexer_kl
from pallas_kernels.indexer_topk import select
from pallas_kernels.ngram_lookup import ngram_lookup
from pallas_kernels.sparse_mla import sparse_mla
from pallas_kernels.sparse_mla_decode import sparse_mla_decode_paged

CASES = (
    "indexer_topk", "indexer_topk_window_apart", "indexer_topk_hi", "indexer_blocks", "indexer_kl_fwd_bwd",
    "sparse_mla_fwd_bwd", "sparse_mla_decode_paged", "ngram_lookup_fwd_bwd",
)


def _sum(outputs):
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(outputs))


def kernel_cases(cfg: Config, T: int = 512, batch: int = 1, seed: int = 0, impl: str = "pallas"):
    """{name: (fn, args, n_pallas_calls)} with T queries and keys per sequence (bf16 activations); impl="xla"
    gives the same calls on the plain-JAX path (the parity reference)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, dtype=jnp.bfloat16):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    B, I, J, K = batch, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    N, R, Hr = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q, k, w = normal(B, T, I, J), normal(B, T, J), normal(B, T, I, dtype=jnp.float32)
    # Causal selections (sorted, -1 where the query has fewer than K earlier keys), as the indexer gives.
    picks = np.sort(rng.integers(0, T, (B, T, K)), axis=-1)
    idx = jnp.asarray(np.where(picks <= np.arange(T)[None, :, None], picks, -1), jnp.int32)
    target = jnp.asarray(rng.random((B, T, K)), jnp.float32)
    hi_cfg = cfg.replace(hi_enabled=True, hi_min_len=T // 2)
    page = 64
    pages = jnp.asarray(rng.permutation(B * T // page).reshape(B, T // page), jnp.int32)
    tables = normal(sum(cfg.ngram_table_rows), cfg.ngram_dim, dtype=jnp.float32)
    proj = normal(cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size, dtype=jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)

    def mla_grads(*a):
        return jax.grad(lambda *a: _sum(sparse_mla(*a, idx, 0.1, impl=impl, return_probs=True)),
                        argnums=(0, 1, 2, 3))(*a)

    def kl_grads(q, k, w):
        return jax.grad(lambda *a: sparse_indexer_kl(*a, idx, target, impl=impl), argnums=(0, 1, 2))(q, k, w)

    def ngram_grads(t, p):
        return jax.grad(lambda *a: _sum(ngram_lookup(*a, tokens, cfg, impl=impl)), argnums=(0, 1))(t, p)

    cases = {
        "indexer_topk": (lambda *a: select(*a, pos, pos, cfg, impl=impl), (q, k, w), 1),
        "indexer_topk_window_apart": (
            lambda *a: select(*a, pos, pos, cfg, window_apart=True, impl=impl), (q, k, w), 1),
        "indexer_topk_hi": (lambda *a: select(*a, pos, pos, hi_cfg, impl=impl), (q, k, w), 1),
        "indexer_blocks": (
            lambda *a: select_blocks(*a, pos, pos, cfg, block_size=cfg.hi_block_size, impl=impl),
            (q, k, w), 1),
        "indexer_kl_fwd_bwd": (kl_grads, (q, k, w), 3),
        "sparse_mla_fwd_bwd": (mla_grads, (normal(B, T, N, R), normal(B, T, N, Hr), normal(B, T, R),
                                           normal(B, T, Hr)), 2),
        "sparse_mla_decode_paged": (
            lambda *a: sparse_mla_decode_paged(*a, pages, idx[:, -1], 0.1, impl=impl),
            (normal(B, N, R), normal(B, N, Hr), normal(B * T // page, page, R + Hr)), 1),
        "ngram_lookup_fwd_bwd": (ngram_grads, (tables, proj), 1),
    }
    assert tuple(cases) == CASES
    return cases
