"""Sorting-network top-k for kernels: what `lax.top_k` does, in operations Pallas lowers for Triton.

Pallas' Triton lowering has no sort, top_k, gather or slice. These bitonic networks (the construction of
Triton's own `tl.sort`) use only reshapes, masked sums over a size-2 axis, compares and selects, on
[rows, n] arrays with n a power of two; every row is sorted on its own.

Elements are (key, id) pairs, ordered by key descending, then id ascending: a strict total order on distinct
ids, so the result is exact whatever the network's shape. `order_key` maps f32 to int32 keys that order like
`lax.top_k` does (a total order: 0.0 above -0.0), so `merge_top` applied tile by tile keeps exactly the
top-K that `lax.top_k` picks on the whole row, ties to the lower id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def order_key(values):
    """int32 keys ordered like f32 `values` under the IEEE total order (negatives: magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


# order_key(-inf) as a Python int: a kernel cannot bitcast a constant (Triton lowers no literal bitcast).
NEG_INF_KEY = int(np.int32(np.float32(-np.inf).view(np.int32)) ^ np.int32(0x7FFFFFFF))


def _first(ka, ia, kb, ib):
    """bool: pair a comes before pair b (key descending, id ascending)."""
    return (ka > kb) | ((ka == kb) & (ia < ib))


def _halves(x, shape):
    """x [R, n] viewed as `shape` [R, groups, 2, stride]; (left, right): each compare pair's members."""
    y = x.reshape(shape)
    side = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    left = jnp.sum(jnp.where(side == 0, y, 0), axis=2, keepdims=True)
    right = jnp.sum(jnp.where(side == 1, y, 0), axis=2, keepdims=True)
    return y, side, left, right


def _compare_swap(keys, ids, stride: int, run: int, descending: bool):
    """One network layer: element j meets j ^ stride. Runs of `run` elements are ordered alternately,
    the first run in the requested direction (run = n: the whole row in one direction)."""
    R, n = keys.shape
    shape = (R, n // (2 * stride), 2, stride)
    yk, side, kl, kr = _halves(keys, shape)
    yi, _, il, ir = _halves(ids, shape)
    group = jax.lax.broadcasted_iota(jnp.int32, (1, shape[1], 1, 1), 1)
    reverse = ((group * 2 * stride) // run) % 2 == 1  # this run is ordered the other way
    swap = _first(kr, ir, kl, il) != (reverse ^ (not descending))
    keys = jnp.where(swap, jnp.where(side == 0, kr, kl), yk).reshape(R, n)
    ids = jnp.where(swap, jnp.where(side == 0, ir, il), yi).reshape(R, n)
    return keys, ids


def _merge(keys, ids, descending: bool):
    """Sorts rows that are bitonic (one rise and one fall, cyclically)."""
    n = keys.shape[1]
    stride = n // 2
    while stride:
        keys, ids = _compare_swap(keys, ids, stride, n, descending)
        stride //= 2
    return keys, ids


def sort(keys, ids, descending: bool = True):
    """Rows of (keys, ids) [R, n] sorted by (key, then id ascending); n a power of two."""
    n = keys.shape[1]
    if n & (n - 1):
        raise ValueError(f"bitonic sort needs a power-of-two row length, got {n}")
    run = 2
    while run <= n:
        stride = run // 2
        while stride:
            keys, ids = _compare_swap(keys, ids, stride, run, descending if run == n else True)
            stride //= 2
        run *= 2
    return keys, ids


def merge_top(top_keys, top_ids, new_keys, new_ids):
    """The first W of (top ∪ new) in descending order: top [R, W] already descending, new [R, m], m <= W,
    both powers of two.

    The new pairs, sorted ascending, meet the last m of top element by element; each position keeps the
    earlier pair. That sequence holds the first W of the union and falls, then rises (bitonic), so one
    merge sorts it.
    """
    R, W = top_keys.shape
    m = new_keys.shape[1]
    if m > W or m & (m - 1) or W & (W - 1):
        raise ValueError(f"merge_top needs power-of-two widths, new <= top; got new {m}, top {W}")
    new_keys, new_ids = sort(new_keys, new_ids, descending=False)
    tk, ti = top_keys.reshape(R, W // m, m), top_ids.reshape(R, W // m, m)
    nk, ni = new_keys[:, None, :], new_ids[:, None, :]
    last = jax.lax.broadcasted_iota(jnp.int32, (1, W // m, 1), 1) == W // m - 1
    take_new = last & _first(nk, ni, tk, ti)
    keys = jnp.where(take_new, nk, tk).reshape(R, W)
    ids = jnp.where(take_new, ni, ti).reshape(R, W)
    return _merge(keys, ids, descending=True)
