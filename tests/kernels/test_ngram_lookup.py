"""Fused N-gram lookup (pallas_kernels/ngram_lookup.py) vs the reference in longcat_jax/model/ngram.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longcat_jax.config import Config
from longcat_jax.model.ngram import hash_ids as hash_ids_eager
from longcat_jax.model.ngram import ngram_embed
from longcat_jax.ops.ngram_hash import segment_windows, table_offsets
from pallas_kernels.ngram_lookup import _hash_windows, _sorted_row_sum, ngram_lookup
from sharding.mesh import make_mesh
from sharding.rules import RULES

TINY = Config.tiny()
# M = int(0.2 * 256) = 51: every modulus (52..58) is below the vocab, so tokens are reduced mod R first; the
# 6-bit operands then have fewer bits than a token (8), so skipping that reduction would give wrong ids.
SMALL_MOD = Config.tiny(ngram_vocab_ratio=0.2)
BF16 = Config.tiny(dtype="bfloat16", param_dtype="bfloat16")
CONFIGS = {"tiny": TINY, "small_mod": SMALL_MOD}
IMPLS = ("xla", "pallas")
EOS = TINY.eos_token_id
# Jitted once per (shape, config): far fewer compilations than op-by-op eager dispatch.
hash_ids = jax.jit(hash_ids_eager, static_argnums=1)


def make_params(cfg: Config, seed: int = 0):
    k_tab, k_proj = jax.random.split(jax.random.key(seed))
    rows = sum(cfg.ngram_table_rows)
    tables = jax.random.normal(k_tab, (rows, cfg.ngram_dim), jnp.float32)
    proj = 0.2 * jax.random.normal(k_proj, (cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size), jnp.float32)
    return tables.astype(cfg.jnp_param_dtype), proj.astype(cfg.jnp_param_dtype)


def make_case(name: str, cfg: Config, seed: int = 1):
    """(tokens [B, T], history [B, N-1] or None): prefill with EOS mid-sequence, a chunk, a decode step."""
    rng = np.random.default_rng(seed)
    H = cfg.ngram_n - 1
    if name == "prefill":
        tokens = rng.integers(0, cfg.vocab_size, (2, 32))
        tokens[0, [0, 9, 10, 20]] = EOS  # at the start, twice in a row, mid-sequence
        tokens[1, [31]] = EOS
        tokens[1, 5] = cfg.vocab_size - 1
        tokens[1, 6] = 0
        return jnp.asarray(tokens, jnp.int32), None
    T = {"chunk": 7, "decode": 1}[name]
    tokens = rng.integers(0, cfg.vocab_size, (2, T))
    history = rng.integers(0, cfg.vocab_size, (2, H))
    history[1, 0] = EOS  # the EOS inside the history ends that segment for the chunk's early windows
    if T > 1:
        tokens[0, 3] = EOS
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(history, jnp.int32)


@functools.partial(jax.jit, static_argnums=3)
def reference(tables, proj, tokens, cfg, history=None):
    return ngram_embed(tables, proj, hash_ids(tokens, cfg, history), cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "block_t", "block_d", "mesh"))
def lookup(tables, proj, tokens, history=None, *, cfg, impl, block_t=32, block_d=None, mesh=None):
    blocks = dict(block_t=block_t, block_d=block_d)
    return ngram_lookup(tables, proj, tokens, cfg, history, impl=impl, mesh=mesh, **blocks)


def f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


# --- exact ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("case", ["prefill", "chunk"])
def test_hash_windows_bit_identical_to_hash_ids(cfg_name, case):
    cfg = CONFIGS[cfg_name]
    tokens, history = make_case(case, cfg)
    B, T = tokens.shape

    @jax.jit
    def kernel_hash(tokens, history):
        windows_t = segment_windows(tokens, history, cfg).reshape(B * T, cfg.ngram_n).T
        return _hash_windows(windows_t, cfg).reshape(B, T, -1)

    got = np.asarray(kernel_hash(tokens, history))
    np.testing.assert_array_equal(got, np.asarray(hash_ids(tokens, cfg, history)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_lookup_reads_exactly_the_reference_rows(impl, cfg_name):
    # Row r of the table holds r and P_g copies column 0 to output column g, so out[..., g] is the row the
    # kernel hashed for branch g: an exact integer in f32, compared bit for bit with hash_ids + offsets.
    cfg = CONFIGS[cfg_name]
    rows = sum(cfg.ngram_table_rows)
    tables = jnp.zeros((rows, cfg.ngram_dim), jnp.float32).at[:, 0].set(jnp.arange(rows, dtype=jnp.float32))
    proj = jnp.zeros((cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size), jnp.float32)
    proj = proj.at[jnp.arange(cfg.ngram_branches), 0, jnp.arange(cfg.ngram_branches)].set(1.0)
    for case in ("prefill", "chunk"):
        tokens, history = make_case(case, cfg)
        out = np.asarray(lookup(tables, proj, tokens, history, cfg=cfg, impl=impl))
        expected = np.asarray(hash_ids(tokens, cfg, history)) + np.asarray(table_offsets(cfg))
        np.testing.assert_array_equal(out[..., : cfg.ngram_branches], expected.astype(np.float32))
        assert not out[..., cfg.ngram_branches :].any()


# --- forward values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg_name", ["tiny", "small_mod", "bf16"])
@pytest.mark.parametrize("case", ["prefill", "chunk", "decode"])
def test_forward_matches_reference(impl, cfg_name, case):
    cfg = {**CONFIGS, "bf16": BF16}[cfg_name]
    tables, proj = make_params(cfg)
    tokens, history = make_case(case, cfg)
    out = lookup(tables, proj, tokens, history, cfg=cfg, impl=impl)
    ref = reference(tables, proj, tokens, cfg, history)
    assert out.shape == tokens.shape + (cfg.hidden_size,) and out.dtype == cfg.jnp_dtype
    # bf16: same bf16 operands and f32 accumulation, only the summation order and the final rounding differ.
    tol = 2e-2 if cfg.dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(f32(out), f32(ref), rtol=tol, atol=tol)


def test_pallas_many_blocks_matches_reference():
    # 4 token blocks x 4 column blocks: block indexing of windows, projections and output all exercised.
    tables, proj = make_params(TINY)
    tokens, _ = make_case("prefill", TINY)
    out = lookup(tables, proj, tokens, cfg=TINY, impl="pallas", block_t=16, block_d=16)
    np.testing.assert_allclose(f32(out), f32(reference(tables, proj, tokens, TINY)), rtol=1e-5, atol=1e-5)


# --- gradients ---------------------------------------------------------------------------------------------


def colliding_tokens(cfg: Config, seed: int = 2):
    """Tokens from a 4-symbol alphabet with EOS: windows recur, so many (token, branch) pairs share a row."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.choice([EOS, 3, 4, 5], size=(2, 32)), jnp.int32)


# Module-level jits keyed on the static arguments, so tests with the same shapes share one compilation.
@functools.partial(jax.jit, static_argnames=("cfg", "impl", "mesh"))
def lookup_grads(tables, proj, tokens, history, d_out, *, cfg, impl, mesh=None):
    def loss(t, p):
        out = ngram_lookup(t, p, tokens, cfg, history, impl=impl, mesh=mesh)
        return jnp.sum(out.astype(jnp.float32) * d_out)

    return jax.grad(loss, argnums=(0, 1))(tables, proj)


@functools.partial(jax.jit, static_argnames=("cfg",))
def reference_grads(tables, proj, tokens, history, d_out, *, cfg):
    def loss(t, p):
        return jnp.sum(reference(t, p, tokens, cfg, history).astype(jnp.float32) * d_out)

    return jax.grad(loss, argnums=(0, 1))(tables, proj)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg_name", ["tiny", "small_mod", "bf16"])
def test_gradients_match_reference(impl, cfg_name):
    cfg = {**CONFIGS, "bf16": BF16}[cfg_name]
    tables, proj = make_params(cfg)
    tokens = colliding_tokens(cfg)
    history = jnp.asarray([[4, 4], [EOS, 3]], jnp.int32)[:, : cfg.ngram_n - 1]
    d_out = jax.random.normal(jax.random.key(5), tokens.shape + (cfg.hidden_size,))
    got = lookup_grads(tables, proj, tokens, history, d_out, cfg=cfg, impl=impl)
    want = reference_grads(tables, proj, tokens, history, d_out, cfg=cfg)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = float(np.abs(f32(w)).max())
        tol = 2e-2 * scale if cfg.dtype == "bfloat16" else 1e-5 * scale
        np.testing.assert_allclose(f32(g), f32(w), rtol=0, atol=tol)
    # The collisions are real: some table rows receive the gradient of several (token, branch) pairs.
    hit_rows = np.asarray(hash_ids(tokens, cfg, history)) + np.asarray(table_offsets(cfg))
    assert np.unique(hit_rows).size < hit_rows.size // 2


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_bit_identical_across_runs(impl):
    tables, proj = make_params(TINY)
    tokens = colliding_tokens(TINY)
    d_out = jax.random.normal(jax.random.key(6), tokens.shape + (TINY.hidden_size,))
    first = lookup_grads(tables, proj, tokens, None, d_out, cfg=TINY, impl=impl)
    second = lookup_grads(tables, proj, tokens, None, d_out, cfg=TINY, impl=impl)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sorted_row_sum_independent_of_pair_order():
    # Values of wildly different magnitude make f32 sums order-sensitive: (1e8 + 1) - 1e8 = 0 but
    # (1e8 - 1e8) + 1 = 1. The (row, key) sort must make every layout of the same pairs give the same bits.
    rng = np.random.default_rng(3)
    num_pairs, num_rows, width = 64, 5, 3
    rows = rng.integers(0, num_rows + 1, num_pairs)  # row == num_rows: dropped (another shard's row)
    magnitudes = 10.0 ** rng.integers(-3, 9, (num_pairs, 1))
    values = (rng.standard_normal((num_pairs, width)) * magnitudes).astype(np.float32)
    keys = np.arange(num_pairs)
    fn = jax.jit(_sorted_row_sum, static_argnums=3)
    base = np.asarray(fn(jnp.asarray(rows), jnp.asarray(keys), jnp.asarray(values), num_rows))
    exact = np.zeros((num_rows + 1, width))
    np.add.at(exact, rows, values.astype(np.float64))
    np.testing.assert_allclose(base, exact[:num_rows], rtol=1e-6, atol=1e-6 * np.abs(values).max())
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(num_pairs)
        shuffled = fn(jnp.asarray(rows[perm]), jnp.asarray(keys[perm]), jnp.asarray(values[perm]), num_rows)
        np.testing.assert_array_equal(np.asarray(shuffled), base)


# --- row-sharded tables over "vp" --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [{"vp": 8}, {"vp": 4, "dp": 2}], ids=["vp8", "vp4dp2"])
def test_row_sharded_matches_unsharded_reference(impl, sizes):
    mesh = make_mesh(sizes)
    cfg = SMALL_MOD if "dp" in sizes else TINY
    tables, proj = make_params(cfg)
    tokens = colliding_tokens(cfg).at[0, 7].set(cfg.vocab_size - 1)
    history = jnp.asarray([[3, EOS], [5, 4]], jnp.int32)
    tables = jax.device_put(tables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("vp", None)))
    out = lookup(tables, proj, tokens, history, cfg=cfg, impl=impl, mesh=mesh)
    ref = reference(tables, proj, tokens, cfg, history)
    np.testing.assert_allclose(f32(out), f32(ref), rtol=1e-5, atol=1e-5)

    d_out = jax.random.normal(jax.random.key(7), tokens.shape + (cfg.hidden_size,))
    got = lookup_grads(tables, proj, tokens, history, d_out, cfg=cfg, impl=impl, mesh=mesh)
    want = reference_grads(tables, proj, tokens, history, d_out, cfg=cfg)
    for g, w in zip(got, want):
        np.testing.assert_allclose(f32(g), f32(w), rtol=0, atol=1e-5 * float(np.abs(f32(w)).max()))
    assert got[0].sharding.spec[0] == "vp"  # each shard produced the gradient of its own rows


def test_row_sharding_taken_from_set_mesh():
    tables, proj = make_params(TINY)
    tokens, _ = make_case("prefill", TINY)
    with jax.set_mesh(make_mesh({"vp": 8})):
        out = jax.jit(lambda t, p: ngram_lookup(t, p, tokens, TINY, impl="pallas"))(tables, proj)
        xla_fn = jax.jit(lambda t, p: ngram_lookup(t, p, tokens, TINY, impl="xla"))
        text = xla_fn.lower(tables, proj).as_text()
    assert "all-reduce" in text or "all_reduce" in text  # the psum of the vp partials is really there
    np.testing.assert_allclose(f32(out), f32(reference(tables, proj, tokens, TINY)), rtol=1e-5, atol=1e-5)


def test_rows_axis_follows_the_rules_table():
    """The rows shard over whatever mesh axis the rules table gives "ngram_rows": mapped to "tp" instead of
    "vp", a tp mesh shards them (the psum of the partials is there, the table gradient comes back row-sharded
    over tp, values unchanged) and a vp mesh no longer does."""
    rules = tuple((name, "tp" if name == "ngram_rows" else axes) for name, axes in RULES)
    tables, proj = make_params(TINY)
    tokens, history = make_case("prefill", TINY)
    d_out = jax.random.normal(jax.random.key(3), tokens.shape + (TINY.hidden_size,))

    def run(mesh):
        return ngram_lookup(tables, proj, tokens, TINY, history, impl="xla", mesh=mesh, rules=rules)

    def all_reduces(mesh):
        text = jax.jit(lambda: run(mesh)).lower().as_text()
        return "all-reduce" in text or "all_reduce" in text

    def grads(mesh):
        def loss(t, p):
            out = ngram_lookup(t, p, tokens, TINY, history, impl="xla", mesh=mesh, rules=rules)
            return jnp.sum(out.astype(jnp.float32) * d_out)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(tables, proj)

    tp, vp = make_mesh({"tp": 8}), make_mesh({"vp": 8})
    assert all_reduces(tp) and not all_reduces(vp)
    got = grads(tp)
    want = reference_grads(tables, proj, tokens, history, d_out, cfg=TINY)
    for g, w in zip(got, want):
        np.testing.assert_allclose(f32(g), f32(w), rtol=0, atol=1e-5 * float(np.abs(f32(w)).max()))
    assert got[0].sharding.spec[0] == "tp"


# --- errors ------------------------------------------------------------------------------------------------


def test_clear_errors():
    tables, proj = make_params(TINY)
    tokens, _ = make_case("chunk", TINY)
    with pytest.raises(ValueError, match="impl must be one of"):
        ngram_lookup(tables, proj, tokens, TINY, impl="triton")
    with pytest.raises(ValueError, match="N-gram embedding is off"):
        ngram_lookup(tables, proj, tokens, Config.tiny(ngram_n=0), impl="xla")
    with pytest.raises(ValueError, match="history must be"):
        ngram_lookup(tables, proj, tokens, TINY, jnp.zeros((2, 5), jnp.int32), impl="xla")
    with pytest.raises(ValueError, match="tables must be"):
        ngram_lookup(tables[:-1], proj, tokens, TINY, impl="xla")
    with pytest.raises(ValueError, match="proj must be"):
        ngram_lookup(tables, proj[1:], tokens, TINY, impl="xla")
    with pytest.raises(ValueError, match="block_t"):
        ngram_lookup(tables, proj, tokens, TINY, impl="pallas", block_t=24)
    with pytest.raises(ValueError, match="block_d"):
        ngram_lookup(tables, proj, tokens, TINY, impl="pallas", block_d=48)
    odd = Config.tiny(ngram_vocab_ratio=0.504)  # M = 129: 4 * 129 + 16 = 532 rows, not a multiple of 8
    odd_tables, odd_proj = make_params(odd)
    with pytest.raises(ValueError, match="split evenly"):
        ngram_lookup(odd_tables, odd_proj, tokens, odd, impl="xla", mesh=make_mesh({"vp": 8}))
