"""Hashed N-gram lookup, Mosaic kernel (pallas_kernels/tpu_ngram_lookup.py), through `ngram_lookup(impl=
"pallas")` on a simulated TPU: exact rows, forward and gradients equal the reference, and the forward and
backward lower for TPU, row-sharded too."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.gpu_cases import kernel_cases
from longcat_jax.config import Config
from longcat_jax.ops.ngram_hash import table_offsets
from pallas_kernels import impl
from pallas_kernels import tpu_ngram_lookup as tpu_module
from pallas_kernels.ngram_lookup import ngram_lookup
from pallas_kernels.tpu_ngram_lookup import lookup_call
from sharding.mesh import make_mesh
from tests.kernels.test_ngram_lookup import (
    BF16,
    SMALL_MOD,
    TINY,
    colliding_tokens,
    f32,
    hash_ids,
    make_case,
    make_params,
    reference,
    reference_grads,
)
from tests.kernels.tpu_cases import TPU_CALL, lower_for_tpu


# Own jits (not test_ngram_lookup's): a jit's cache does not see the `interpreting` context, so a function
# traced there for the Triton kernels would be reused here.
@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def tpu_lookup(tables, proj, tokens, history=None, *, cfg, mesh=None):
    with impl.interpreting("tpu"):
        return ngram_lookup(tables, proj, tokens, cfg, history, impl="pallas", mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def tpu_lookup_grads(tables, proj, tokens, history, d_out, *, cfg, mesh=None):
    def loss(t, p):
        return jnp.sum(tpu_lookup(t, p, tokens, history, cfg=cfg, mesh=mesh).astype(jnp.float32) * d_out)

    return jax.grad(loss, argnums=(0, 1))(tables, proj)


def test_reads_exactly_the_hashed_rows(monkeypatch):
    """Row r of the table holds r and P_g copies column 0 to output column g: out[..., g] is the row the
    kernel fetched by DMA for branch g, compared bit for bit with hash_ids + offsets (mod-reduced config)."""
    cfg = SMALL_MOD
    rows = sum(cfg.ngram_table_rows)
    tables = jnp.zeros((rows, cfg.ngram_dim), jnp.float32).at[:, 0].set(jnp.arange(rows, dtype=jnp.float32))
    proj = jnp.zeros((cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size), jnp.float32)
    proj = proj.at[jnp.arange(cfg.ngram_branches), 0, jnp.arange(cfg.ngram_branches)].set(1.0)
    calls = []
    monkeypatch.setattr(tpu_module, "lookup_call", lambda *a: calls.append(a) or lookup_call(*a))
    tokens, history = make_case("chunk", cfg)
    out = np.asarray(tpu_lookup(tables, proj, tokens, history, cfg=cfg))
    assert calls, "ngram_lookup(impl='pallas') on TPU must run the Mosaic kernel"
    expected = np.asarray(hash_ids(tokens, cfg, history)) + np.asarray(table_offsets(cfg))
    np.testing.assert_array_equal(out[..., : cfg.ngram_branches], expected.astype(np.float32))
    assert not out[..., cfg.ngram_branches :].any()


@pytest.mark.parametrize("cfg_name,case", [("tiny", "prefill"), ("bf16", "decode")])
def test_forward_matches_reference(cfg_name, case):
    cfg = {"tiny": TINY, "bf16": BF16}[cfg_name]
    tables, proj = make_params(cfg)
    tokens, history = make_case(case, cfg)
    out = tpu_lookup(tables, proj, tokens, history, cfg=cfg)
    assert out.shape == tokens.shape + (cfg.hidden_size,) and out.dtype == cfg.jnp_dtype
    tol = 2e-2 if cfg.dtype == "bfloat16" else 1e-5
    want = reference(tables, proj, tokens, cfg, history)
    np.testing.assert_allclose(f32(out), f32(want), rtol=tol, atol=tol)


def test_column_blocks_reuse_the_rows_fetched_once():
    """D = 384 in three column blocks of 128: blocks j > 0 read the rows DMA-ed at j = 0 (a masked-out row
    and a padded token block included)."""
    rng = np.random.default_rng(0)
    rows, dim, G, D, tokens = 40, 16, 3, 384, 20
    tables = jnp.asarray(rng.standard_normal((rows, dim)), jnp.float32)
    proj = jnp.asarray(rng.standard_normal((G, dim, D)), jnp.float32)
    local = rng.integers(0, rows, (tokens, G))
    owned = rng.random((tokens, G)) > 0.2
    out = jax.jit(lookup_call, static_argnums=(4, 5, 6, 7))(
        tables, proj, jnp.asarray(local, jnp.int32), jnp.asarray(owned), 16, 128, jnp.float32, jnp.float32)
    emb = np.where(owned[..., None], np.asarray(tables)[local], 0)
    np.testing.assert_allclose(np.asarray(out), np.einsum("tgk,gkd->td", emb, np.asarray(proj)), rtol=1e-5,
                               atol=1e-4)


def test_gradients_match_reference():
    """The custom VJP is shared with the other paths; here it runs around the Mosaic forward."""
    cfg = TINY
    tables, proj = make_params(cfg)
    tokens = colliding_tokens(cfg)
    history = jnp.asarray([[4, 4], [0, 3]], jnp.int32)[:, : cfg.ngram_n - 1]
    d_out = jax.random.normal(jax.random.key(5), tokens.shape + (cfg.hidden_size,))
    want = reference_grads(tables, proj, tokens, history, d_out, cfg=cfg)
    got = tpu_lookup_grads(tables, proj, tokens, history, d_out, cfg=cfg)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(f32(g), f32(w), rtol=0, atol=1e-5 * float(np.abs(f32(w)).max()))


def test_row_sharded_lowers_for_tpu():
    """With the rows sharded over vp, each shard runs the Mosaic kernel on its slice inside a shard_map manual
    over every mesh axis (Mosaic refuses a partially automatic one). Not run here: under a mesh of CPU
    devices the TPU interpreter's callbacks fail, a limit of the interpreter, not of the kernel."""
    cfg = TINY
    tables, proj = make_params(cfg)
    tokens, history = make_case("chunk", cfg)
    mesh = make_mesh({"vp": 8})

    def forward(t, p):
        return ngram_lookup(t, p, tokens, cfg, history, impl="pallas", mesh=mesh)

    text = lower_for_tpu(forward, (tables, proj))
    assert text.count(TPU_CALL) == 1 and ("all-reduce" in text or "all_reduce" in text)


def test_forward_and_backward_lower_for_tpu_at_small_preset_shapes():
    fn, args, n_kernels = kernel_cases(Config.small(), T=256)["ngram_lookup_fwd_bwd"]
    assert lower_for_tpu(fn, args).count(TPU_CALL) == n_kernels == 1  # the backward is XLA (custom VJP)
