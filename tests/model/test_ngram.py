"""Hashed N-gram embedding (docs/architecture.md#ngram): exact ids against an independent big-int
reference and literals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longcat_jax.config import Config
from longcat_jax.model.ngram import NgramEmbedding, next_history, ngram_embed
from longcat_jax.model.ngram import hash_ids as hash_ids_eager
from longcat_jax.ops.ngram_hash import table_offsets

# Jitted once per (shape, config): far fewer compilations than op-by-op eager dispatch, so tests stay fast.
hash_ids = jax.jit(hash_ids_eager, static_argnums=1)

# --- independent reference: Python ints, loops, no modular tricks -----------------------------------------


def ref_ids_row(row, cfg: Config, history=()):
    """ids [T][G] for one sequence; history = earlier tokens of the same sequence (any length)."""
    ctx = list(history) + list(row)
    start = len(history)
    V, K, eos = cfg.vocab_size, cfg.ngram_splits, cfg.eos_token_id
    M = int(cfg.ngram_vocab_ratio * V)
    out = []
    for t in range(start, len(ctx)):
        # Walk back from t; an EOS strictly before t ends an earlier segment, so it and everything older is 0.
        window = [ctx[t]]
        alive = True
        for d in range(1, cfg.ngram_n):
            if alive and (t - d < 0 or ctx[t - d] == eos):
                alive = False
            window.append(ctx[t - d] if alive else 0)
        ids = []
        for n in range(2, cfg.ngram_n + 1):
            for j in range(K):
                i = (n - 2) * K + j
                R = M + 2 * i + 1
                ids.append(sum(window[d] * V**d for d in range(n)) % R)  # full-size integer, then reduce
        out.append(ids)
    return out


def ref_ids(tokens, cfg: Config, history=None):
    tokens = np.asarray(tokens)
    if history is None:
        hist = [()] * tokens.shape[0]
    else:
        hist = [tuple(int(x) for x in h) for h in np.asarray(history)]
    return np.array([ref_ids_row([int(x) for x in r], cfg, h) for r, h in zip(tokens, hist)], dtype=np.int64)


def check(tokens, cfg, history=None):
    got = np.asarray(hash_ids(jnp.asarray(tokens, jnp.int32), cfg, history))
    assert got.dtype == np.int32 and got.shape == np.asarray(tokens).shape + (cfg.ngram_branches,)
    np.testing.assert_array_equal(got.astype(np.int64), ref_ids(tokens, cfg, history))
    return got


TINY = Config.tiny()
TINY5 = Config.tiny(ngram_n=5, ngram_splits=3)  # deeper windows with the tiny vocab
FULL = Config.longcat_2()  # V = 163840, R_i ~ 16.5M: hash only, never build the tables
HAND = Config.tiny(vocab_size=10, ngram_vocab_ratio=1.0, ngram_n=3, ngram_splits=2)  # R = 11, 13, 15, 17


# --- hand-computed literals (catch a wrong formula even if the reference shared it) ---------------------


def test_hand_computed_literals():
    # EOS = 2. Windows (t, t-1, t-2): [7,0,0] [9,7,0] [2,9,7] (EOS keeps its own history) [5,0,0] [3,5,0].
    # Sums: 7 | 9+70=79 | 2+90+700=792 | 5 | 3+50=53; n=2 branches use only the first two terms.
    tokens = [[7, 9, 2, 5, 3]]
    expected = [[[7, 7, 7, 7], [2, 1, 4, 11], [4, 1, 12, 10], [5, 5, 5, 5], [9, 1, 8, 2]]]
    got = hash_ids(jnp.asarray(tokens), HAND)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert HAND.ngram_table_rows == (11, 13, 15, 17)
    assert table_offsets(HAND) == (0, 11, 24, 39)


def test_full_size_literal():
    # LongCat-2.0, branch 0 (bigram, R_0 = 16476898) and branch 12 (5-gram, R_12 = 16476922); V mod R = V.
    # At t=1 the window is (b, a, 0, 0, 0): b + a * 163840 = 26,843,481,760
    #   = 1629 * 16,476,898 + 2,614,918 = 1629 * 16,476,922 + 2,575,822.
    a, b = 163839, 100000
    got = np.asarray(hash_ids(jnp.asarray([[a, b]]), FULL))
    assert FULL.ngram_table_rows[0] == 16476898 and FULL.ngram_table_rows[12] == 16476922
    assert got[0, 0, 0] == a and got[0, 0, 12] == a
    assert got[0, 1, 0] == 2614918 and got[0, 1, 12] == 2575822


# --- known answers from the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, TINY5], ids=["n3", "n5"])
def test_eos_at_every_offset(cfg):
    T = 9
    rng = np.random.default_rng(0)
    base = rng.integers(3, cfg.vocab_size, size=T)
    rows = []
    for p in range(T):  # one EOS at each position
        r = base.copy()
        r[p] = cfg.eos_token_id
        rows.append(r)
    for p in range(T - 1):  # two EOS in a row
        r = base.copy()
        r[p : p + 2] = cfg.eos_token_id
        rows.append(r)
    rows.append(np.full(T, cfg.eos_token_id))
    check(np.stack(rows), cfg)


def test_token_zero_and_max():
    for cfg in (TINY5, FULL):
        V = cfg.vocab_size
        rows = np.array([[0] * 7, [V - 1] * 7, [V - 1, 0, V - 1, 0, cfg.eos_token_id, V - 1, V - 1]])
        check(rows, cfg)


def test_shorter_than_n_and_batch_rows_differ():
    for T in (1, 2, 3):
        toks = np.random.default_rng(T).integers(0, TINY5.vocab_size, size=(3, T))
        check(toks, TINY5)
    toks = np.array([[5, 6, 7, 8, 9, 10], [5, 6, 2, 8, 9, 10]])
    got = check(toks, TINY5)
    assert (got[0, 3:] != got[1, 3:]).any() and (got[0, :2] == got[1, :2]).all()


def test_full_size_exact_random():
    rng = np.random.default_rng(1)
    V = FULL.vocab_size
    toks = rng.integers(V - 5000, V, size=(2, 40))  # large ids stress the chunked mulmod
    toks[1, rng.choice(40, 6, replace=False)] = FULL.eos_token_id
    toks[0, :5] = rng.integers(0, V, size=5)
    check(toks, FULL)


@pytest.mark.parametrize("ratio", [4.0e6, 0.05], ids=["moduli_near_2^30", "moduli_below_vocab"])
def test_extreme_moduli(ratio):
    # ~2^30 moduli force 2-bit chunks; moduli below V exercise the token pre-reduction.
    cfg = Config.tiny(ngram_vocab_ratio=ratio, ngram_n=4)
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 12))
    toks[:, -1] = cfg.vocab_size - 1
    toks[1, 5] = cfg.eos_token_id
    check(toks, cfg)


# --- history, chunking, jit -----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, TINY5, FULL], ids=["n3", "n5", "full"])
def test_chunked_equals_full(cfg):
    rng = np.random.default_rng(3)
    T = 13
    toks = rng.integers(0, cfg.vocab_size, size=(2, T))
    toks[0, [2, 7, 8]] = cfg.eos_token_id
    toks[1, 11] = cfg.eos_token_id
    full = np.asarray(hash_ids(jnp.asarray(toks), cfg))
    for cuts in ([1] * T, [2, 1, 4, 6], [5, 8]):
        hist, parts, s = None, [], 0
        for c in cuts:
            chunk = jnp.asarray(toks[:, s : s + c])
            parts.append(np.asarray(hash_ids(chunk, cfg, hist)))
            hist = next_history(hist, chunk, cfg)
            s += c
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    # History against the reference too, and the [history; tokens] definition.
    H = cfg.ngram_n - 1
    check(toks[:, H:], cfg, history=toks[:, :H])
    cat = np.asarray(hash_ids(jnp.asarray(toks), cfg))[:, H:]
    with_hist = hash_ids(jnp.asarray(toks[:, H:]), cfg, jnp.asarray(toks[:, :H]))
    np.testing.assert_array_equal(np.asarray(with_hist), cat)


def test_empty_history_forms_agree():
    cfg = TINY5
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 6)))
    H = cfg.ngram_n - 1
    none = np.asarray(hash_ids(toks, cfg))
    for fill in (0, cfg.eos_token_id):
        np.testing.assert_array_equal(np.asarray(hash_ids(toks, cfg, jnp.full((2, H), fill))), none)
    h = next_history(None, toks[:, :2], cfg)  # shorter than N-1: zero-padded on the left
    want = np.concatenate([np.zeros((2, 2)), np.asarray(toks[:, :2])], 1)
    np.testing.assert_array_equal(np.asarray(h), want)
    np.testing.assert_array_equal(np.asarray(hash_ids(toks[:, 2:], cfg, h)), none[:, 2:])


def test_jit():
    toks = jnp.asarray(np.random.default_rng(5).integers(0, FULL.vocab_size, size=(2, 9)))
    hist = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
    f = jax.jit(hash_ids_eager, static_argnums=1)
    eager = hash_ids_eager(toks, FULL, hist)
    np.testing.assert_array_equal(np.asarray(f(toks, FULL, hist)), np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(f(toks, FULL)), ref_ids(toks, FULL))
    g = jax.jit(next_history, static_argnums=2)
    want = [[2, 3, 4, toks[0, 0]], [6, 7, 8, toks[1, 0]]]
    np.testing.assert_array_equal(np.asarray(g(hist, toks[:, :1], FULL)), want)


# --- tables and embedding -------------------------------------------------------------------------------


def test_table_offsets():
    for cfg in (TINY, TINY5, FULL):
        rows = [int(cfg.ngram_vocab_ratio * cfg.vocab_size) + 2 * i + 1 for i in range(cfg.ngram_branches)]
        off = table_offsets(cfg)
        assert len(off) == cfg.ngram_branches and off[0] == 0
        assert all(off[i + 1] - off[i] == rows[i] for i in range(len(rows) - 1))
        assert off[-1] + rows[-1] == sum(rows)
    assert sum(FULL.ngram_table_rows) == 16 * 16476897 + 16 * 16 and FULL.ngram_table_rows[-1] == 16476928


def test_ngram_embed_equals_branch_loop():
    cfg = TINY5
    G, Dn, D = cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size
    rows = cfg.ngram_table_rows
    k1, k2 = jax.random.split(jax.random.key(0))
    tables = jax.random.normal(k1, (sum(rows), Dn))
    proj = jax.random.normal(k2, (G, Dn, D))
    toks = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 7)))
    ids = hash_ids(toks, cfg)
    got = np.asarray(ngram_embed(tables, proj, ids, cfg))
    t_np, p_np, ids_np = np.asarray(tables, np.float64), np.asarray(proj, np.float64), np.asarray(ids)
    want = np.zeros((2, 7, D))
    start = 0
    for i in range(G):  # branch table i is its own slice of rows
        table_i = t_np[start : start + rows[i]]
        want += table_i[ids_np[..., i]] @ p_np[i]
        start += rows[i]
    assert got.dtype == np.float32 and got.shape == (2, 7, D)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_module():
    cfg = TINY
    with nnx.use_eager_sharding(False):
        m = NgramEmbedding(cfg, nnx.Rngs(0))
    assert m.tables[...].shape == (sum(cfg.ngram_table_rows), cfg.ngram_dim)
    assert m.proj[...].shape == (cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size)
    assert m.tables.get_metadata()["out_sharding"] == ("ngram_rows", "ngram_dim")
    assert m.proj.get_metadata()["out_sharding"] == ("ngram_branch", "ngram_dim", "embed")
    assert 0.015 < float(jnp.std(m.tables[...])) < 0.025
    toks = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 5)))
    hist = jnp.asarray([[3, 2], [9, 9]])
    out = m(toks, hist)
    want = ngram_embed(m.tables[...], m.proj[...], hash_ids(toks, cfg, hist), cfg)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert out.shape == (2, 5, cfg.hidden_size)


def test_full_size_abstract_shapes():
    with nnx.use_eager_sharding(False):
        m = nnx.eval_shape(lambda: NgramEmbedding(FULL, nnx.Rngs(0)))
    assert m.tables.shape == (263630608, 512) and m.proj.shape == (16, 512, 8192)


def test_reference_lookup_on_vp_reads_rows_where_they_live():
    """EMBP on the reference path: with the table row-sharded over vp=8, each device gathers only its own rows
    (masked) and one all-reduce of the looked-up rows [B, T, G, dim] combines them: no all-gather of the
    table. The table gradient stays row-sharded, and both equal one device's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sharding.mesh import make_mesh

    cfg = Config.tiny()
    mesh = make_mesh({"vp": 8})
    rng = np.random.RandomState(0)
    tables = jnp.asarray(rng.randn(sum(cfg.ngram_table_rows), cfg.ngram_dim).astype(np.float32))
    proj = jnp.asarray(rng.randn(cfg.ngram_branches, cfg.ngram_dim, cfg.hidden_size).astype(np.float32))
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 16)))

    def loss(tables, proj):
        return (ngram_embed(tables, proj, hash_ids_eager(tokens, cfg), cfg) ** 2).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(tables, proj)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(tables, NamedSharding(mesh, P("vp")))
        compiled = step.lower(sharded, proj).compile()
        got = compiled(sharded, proj)
    hlo = compiled.as_text()
    assert " all-gather(" not in hlo and " all-gather-start(" not in hlo
    reduces = [line for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line]
    assert len(reduces) == 1 and f"[2,16,{cfg.ngram_branches},{cfg.ngram_dim}]" in reduces[0]
    assert got[1][0].sharding.spec == P("vp")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
