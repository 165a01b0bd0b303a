"""The CPU serving step's custom calls against their references, their dispatch, and the build without a
compiler."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_serving

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU custom call")


@pytest.fixture(scope="module")
def built():
    assert cpu_serving.available(), "the kernel did not build (a C++ compiler is part of the test machine)"


def random_weight(rng, shape, dtype):
    """A random weight of `dtype` and its exact float64 value."""
    w = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return w, np.asarray(w.astype(jnp.float32), np.float64)


# Rows 1..16 (blocks of 8 or 4 and their remainders), columns with and without a partial panel (120: a half
# panel and single columns past the last panel), odd K; float32 weights and bfloat16 ones (read as they are,
# widened exactly).
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 5, 1), (3, 64, 31), (8, 512, 1536), (13, 100, 257), (16, 7, 64),
                                   (2, 40, 120)])
def test_equals_float64_reference_and_each_row_is_independent_of_the_others(built, m, k, n, dtype):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), np.float32)
    w, w64 = random_weight(rng, (k, n), dtype)
    y = np.asarray(jax.jit(cpu_serving.small_rows_matmul)(x, w))
    ref = x.astype(np.float64) @ w64
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # Summed in order of k whatever the batch: a row alone gives the same bits (batch invariance).
    alone = np.asarray(jax.jit(cpu_serving.small_rows_matmul)(x[-1:], w))
    np.testing.assert_array_equal(alone[0], y[-1])


def test_matmul_dispatch(built):
    """The custom call only inside `small_rows`, for float32 x (float32 or bfloat16 w) and at most MAX_ROWS
    rows; w's trailing axes are flattened and restored (an MLA up-projection [R, N, H])."""
    x, w = jnp.ones((2, 3, 8), jnp.float32), jnp.ones((8, 4, 5), jnp.float32)

    def hlo(x, w, enabled=True):  # a new function each time: jit reuses a trace of the same one
        with cpu_serving.small_rows(enabled):
            return jax.jit(lambda x, w: cpu_serving.matmul(x, w)).lower(x, w).as_text()

    assert "longcat_small_rows_matmul" in hlo(x, w)
    assert "longcat_small_rows_matmul" not in hlo(x, w, enabled=False)
    assert "longcat_small_rows_matmul" not in hlo(jnp.ones((cpu_serving.MAX_ROWS + 1, 8)), w)
    assert "longcat_small_rows_matmul" not in hlo(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert "longcat_small_rows_matmul" in hlo(x, w.astype(jnp.bfloat16))
    many = jnp.ones((cpu_serving.MAX_ROWS + 1, 8))  # a bfloat16 weight at any row count: XLA would convert it
    assert "longcat_small_rows_matmul" in hlo(many, w.astype(jnp.bfloat16))
    with cpu_serving.small_rows():
        y = jax.jit(cpu_serving.matmul)(x, w)
    np.testing.assert_array_equal(y, jnp.tensordot(x, w, 1))
    # Outside it, in x's dtype whatever w's (XLA's dot after a cast).
    y = cpu_serving.matmul(x, w.astype(jnp.bfloat16))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, jnp.tensordot(x, w, 1))


def test_compute_weight_keeps_bfloat16_only_for_the_serving_kernels():
    w = jnp.ones((4, 4), jnp.bfloat16)
    assert cpu_serving.compute_weight(w, jnp.float32).dtype == jnp.float32
    with cpu_serving.small_rows():
        assert cpu_serving.compute_weight(w, jnp.float32).dtype == jnp.bfloat16
        assert cpu_serving.compute_weight(w.astype(jnp.float16), jnp.float32).dtype == jnp.float32
        assert cpu_serving.compute_weight(jnp.ones((4, 4)), jnp.bfloat16).dtype == jnp.bfloat16


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match=r"\[M, K\] @ \[K, N\]"):
        cpu_serving.small_rows_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="float32 x and a float32 or bfloat16 w"):
        cpu_serving.small_rows_matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match="float32 x and a float32 or bfloat16 w"):
        cpu_serving.small_rows_matmul(jnp.ones((2, 3)), jnp.ones((3, 5), jnp.float16))


def test_without_a_compiler_the_build_fails_with_a_named_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no library built earlier is found
    with pytest.raises((OSError, subprocess.SubprocessError), match="no-such-compiler"):
        cpu_serving._build()
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left where a later run would look


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_swiglu_equals_the_expert_tiles(built, dtype):
    """Experts with no rows, one row, and more than a block of 8; rows of no expert (sorted last) give 0."""
    from longcat_jax.model.expert_tiles import tiled_expert_ffn

    rng = np.random.default_rng(0)
    E, D, F = 5, 64, 128
    expert = np.array([0] * 11 + [2] + [3] * 3 + [E] * 2)  # sorted; experts 1 and 4 get none
    starts = np.searchsorted(expert, np.arange(E + 1)).astype(np.int32)
    xs = rng.standard_normal((len(expert), D), np.float32)
    w_gate, w_up = (rng.standard_normal((E, D, F), np.float32) * 0.2 for _ in range(2))
    w_down = rng.standard_normal((E, F, D), np.float32) * 0.2
    w_gate, w_up, w_down = (jnp.asarray(w, dtype).astype(jnp.float32) for w in (w_gate, w_up, w_down))
    y = np.asarray(jax.jit(cpu_serving.grouped_swiglu)(xs, starts, *(w.astype(dtype) for w in
                                                                       (w_gate, w_up, w_down))))
    routed = (expert < E)[:, None]
    ref = np.asarray(tiled_expert_ffn(jnp.where(routed, xs, 0), starts, w_gate, w_up, w_down, 2))
    np.testing.assert_allclose(y, np.where(routed, ref, 0), rtol=1e-5, atol=1e-5)
    assert (y[~routed[:, 0]] == 0).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_matmul_equals_the_einsum(built, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 40), np.float32)
    w, w64 = random_weight(rng, (4, 40, 48), dtype)
    with cpu_serving.small_rows():
        lowered = jax.jit(lambda x, w: cpu_serving.heads_matmul(x, w)).lower(x, w)
    assert "longcat_small_rows_heads_matmul" in lowered.as_text()
    ref = np.einsum("...hk,hkn->...hn", x.astype(np.float64), w64)
    np.testing.assert_allclose(np.asarray(lowered.compile()(x, w)), ref, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_equals_the_model_path(built):
    """Against `mla.attend_paged_decode`'s XLA path: rows at position 0 (its own row only), within the first
    block of 64 rows and across blocks (the softmax rescaled per block), a page index past the pool (clamped,
    as XLA's gather is), one sequence alone (its heads split between the threads) and several."""
    from longcat_jax.model.mla import attend_paged_decode

    rng = np.random.default_rng(2)
    P, page, N, R, Hr = 12, 16, 3, 16, 16
    pages = rng.standard_normal((P, page, R + Hr), np.float32)
    table = rng.permutation(P)[:8]
    for positions, tables in [([5], [table[:3]]), ([0, 77, 127], [table, table[::-1], [*table[:7], P + 3]])]:
        B = len(positions)
        q_lat = rng.standard_normal((B, N, R), np.float32)
        q_rope = rng.standard_normal((B, N, Hr), np.float32)
        new_rows = rng.standard_normal((B, R + Hr), np.float32)
        args = (q_lat, q_rope, pages, np.array(tables, np.int32), np.array(positions, np.int32), new_rows)
        ref = jax.jit(attend_paged_decode, static_argnums=6)(*args, 0.3)
        with cpu_serving.small_rows():
            lowered = jax.jit(lambda *a: attend_paged_decode(*a, 0.3)).lower(*args)
        assert "longcat_paged_decode_attention" in lowered.as_text()
        np.testing.assert_allclose(np.asarray(lowered.compile()(*args)), np.asarray(ref), rtol=1e-5,
                                   atol=1e-5)


def test_paged_decode_attention_leaves_one_long_sequence_to_xla(built):
    pages, q = jnp.ones((4, 16, 32)), jnp.ones((1, 2, 32))
    long_table = jnp.zeros((1, cpu_serving.MAX_ALONE_POSITIONS // 16 + 1), jnp.int32)
    with cpu_serving.small_rows():
        assert cpu_serving.paged_attention_applies(q, pages, long_table[:, :-1])
        assert not cpu_serving.paged_attention_applies(q, pages, long_table)
        several = jnp.ones((2, 2, 32)), pages, jnp.zeros((2, 1000), jnp.int32)
        assert cpu_serving.paged_attention_applies(*several)
