"""The in-kernel building blocks against what they replace: bitonic top-k vs lax.top_k, tile_dot vs a dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bitonic
from pallas_kernels.tile_dot import einsum_2d, tile_dot


def tie_heavy_values(rng, rows, n):
    """Small integers (many exact ties) with -0.0, +-inf sprinkled in."""
    v = rng.integers(-3, 4, (rows, n)).astype(np.float32)
    v[rng.random((rows, n)) < 0.15] = -np.inf
    v[rng.random((rows, n)) < 0.05] = np.inf
    v[rng.random((rows, n)) < 0.1] = -0.0
    return jnp.asarray(v)


@pytest.mark.parametrize("n, width, tile", [(64, 16, 4), (128, 32, 32), (256, 64, 16)])
def test_streaming_merge_top_equals_lax_top_k(n, width, tile):
    """Tile by tile, as the indexer kernel streams keys: exactly lax.top_k's indices, ties to the lower."""
    rng = np.random.default_rng(n + width)
    values = tie_heavy_values(rng, 5, n)
    _, want = jax.lax.top_k(values, width)

    @jax.jit
    def stream(values):
        def merge_tile(j, top):  # one compiled body, as in the kernel's fori_loop
            start = j * tile
            tile_ids = start + jax.lax.broadcasted_iota(jnp.int32, (5, tile), 1)
            tile_keys = bitonic.order_key(jax.lax.dynamic_slice_in_dim(values, start, tile, axis=1))
            return bitonic.merge_top(*top, tile_keys, tile_ids)

        init = (jnp.full((5, width), bitonic.NEG_INF_KEY, jnp.int32),
                jnp.full((5, width), np.iinfo(np.int32).max, jnp.int32))
        return jax.lax.fori_loop(0, n // tile, merge_tile, init)

    keys, ids = stream(values)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want))
    assert int(bitonic.order_key(jnp.float32(-jnp.inf))) == bitonic.NEG_INF_KEY


def test_sort_orders_by_value_then_lower_id_both_ways():
    rng = np.random.default_rng(0)
    values = tie_heavy_values(rng, 4, 32)
    ids = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32))
    _, desc = bitonic.sort(bitonic.order_key(values), ids, descending=True)
    _, asc = bitonic.sort(bitonic.order_key(values), ids, descending=False)
    np.testing.assert_array_equal(np.asarray(desc), np.asarray(jax.lax.top_k(values, 32)[1]))
    np.testing.assert_array_equal(np.asarray(asc), np.asarray(desc)[:, ::-1])
    with pytest.raises(ValueError, match="power-of-two"):
        bitonic.sort(bitonic.order_key(values[:, :24]), ids[:, :24])


def test_order_key_is_the_total_order():
    """-inf < -2 < -0.0 < 0.0 < 1e-45 < 3 < inf, as int32 keys."""
    values = jnp.asarray([-np.inf, -2.0, -0.0, 0.0, 1e-45, 3.0, np.inf], jnp.float32)
    keys = np.asarray(bitonic.order_key(values))
    assert (np.diff(keys) > 0).all()


@pytest.mark.parametrize("M, N, C", [(8, 64, 32), (4, 16, 8), (16, 4, 2), (32, 32, 32), (3, 5, 7)])
def test_tile_dot_equals_dot_at_every_tile_size(M, N, C):
    """Sides below 16 are widened by repetition (zeros on the contracted side): the same numbers as a dot."""
    rng = np.random.default_rng(M * N * C)
    a = jnp.asarray(rng.standard_normal((M, C)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((C, N)), jnp.float32)
    want = np.asarray(jnp.dot(a, b, precision="highest"))
    got = tile_dot(a, b, 1, 0, jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(einsum_2d("nk,kr->nr", a, b, "highest")), want,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="free axis"):
        einsum_2d("nk,kr->rn", a, b)
