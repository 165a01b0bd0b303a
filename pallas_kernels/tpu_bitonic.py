"""Sorting-network top-k along the lane axis, in operations Mosaic (TPU) lowers
(docs/architecture.md#determinism).

The TPU form of `bitonic.py`: the same bitonic networks on (key, id) pairs ordered by key descending, then id
ascending (a strict total order on distinct ids), so `merge_top` applied tile by tile keeps exactly the top-K
that `lax.top_k` picks on the whole row, ties to the lower id. Keys come from `bitonic.order_key`.

Mosaic has no sort, top_k or general gather, and its vregs are 2-D [sublanes, lanes], so `bitonic.py`'s
[R, groups, 2, stride] reshapes are no option either. Here every array stays [rows, n] with n a power of two
and a multiple of 128 lanes, and one network layer (element j meets j ^ stride) reads the partner with two
lane rotations (`pltpu.roll`) and a select. Which rotation holds the partner is read off a rotated lane iota
rather than assumed from the rotation's sign convention, so the network is right whichever way the hardware
rotates. Directions come from lane-index bits (integer ops only: no boolean xor or compare of masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.bitonic import _first


def _partners(lane, stride: int, *xs):
    """Each x [R, n] read at lane j ^ stride."""
    n = lane.shape[-1]
    axis = lane.ndim - 1
    # One rotation brings lane j + stride to j, the other j - stride; the iota says which is which.
    from_right = pltpu.roll(lane, n - stride, axis) == (lane ^ stride)
    return [jnp.where(from_right, pltpu.roll(x, n - stride, axis), pltpu.roll(x, stride, axis)) for x in xs]


def _layer(keys, ids, stride: int, run: int, descending: bool):
    """One compare-exchange layer: runs of `run` lanes ordered alternately, the first one `descending`."""
    lane = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
    other_keys, other_ids = _partners(lane, stride, keys, ids)
    # The lower lane of a pair takes the earlier pair in a descending run, the later one in an ascending run.
    flip = (lane >> (stride.bit_length() - 1)) ^ (lane >> (run.bit_length() - 1))
    wants_first = (flip & 1) == (0 if descending else 1)
    other_first = _first(other_keys, other_ids, keys, ids)
    take = jnp.where(wants_first, other_first, _first(keys, ids, other_keys, other_ids))
    return jnp.where(take, other_keys, keys), jnp.where(take, other_ids, ids)


def _merge(keys, ids, descending: bool):
    """Sorts rows that are bitonic (one rise and one fall, cyclically)."""
    n = keys.shape[-1]
    stride = n // 2
    while stride:
        keys, ids = _layer(keys, ids, stride, 2 * n, descending)
        stride //= 2
    return keys, ids


def _check_width(n: int):
    if n & (n - 1) or n % 128:
        raise ValueError(f"lane bitonic networks need a power-of-two width of at least 128 lanes, got {n}")


def sort(keys, ids, descending: bool = True):
    """Rows of (keys, ids) [R, n] in the pair order (key descending, then id ascending), or with
    descending=False in its exact reverse; n a power of two >= 128."""
    n = keys.shape[-1]
    _check_width(n)
    run = 2
    while run <= n:
        stride = run // 2
        while stride:
            # The last stage orders the whole row; earlier runs alternate, the first descending.
            last = run == n
            keys, ids = _layer(keys, ids, stride, 2 * n if last else run, descending if last else True)
            stride //= 2
        run *= 2
    return keys, ids


def merge_top(top_keys, top_ids, new_keys, new_ids):
    """The first W of (top ∪ new) in descending order: top [R, W] already descending, new [R, m], m <= W.

    As `bitonic.merge_top`: the new pairs sorted ascending meet the last m of top lane by lane, each lane
    keeping the earlier pair; the row then falls and rises (bitonic) and one merge sorts it. m and W are
    powers of two >= 128, so the split at W - m is on a lane-tile boundary.
    """
    W, m = top_keys.shape[-1], new_keys.shape[-1]
    _check_width(W)
    _check_width(m)
    if m > W:
        raise ValueError(f"merge_top takes at most W = {W} new lanes, got {m}")
    new_keys, new_ids = sort(new_keys, new_ids, descending=False)
    tail_keys, tail_ids = top_keys[:, W - m:], top_ids[:, W - m:]
    take_new = _first(new_keys, new_ids, tail_keys, tail_ids)
    tail_keys, tail_ids = jnp.where(take_new, new_keys, tail_keys), jnp.where(take_new, new_ids, tail_ids)
    if m < W:
        tail_keys = jnp.concatenate([top_keys[:, : W - m], tail_keys], axis=1)
        tail_ids = jnp.concatenate([top_ids[:, : W - m], tail_ids], axis=1)
    return _merge(tail_keys, tail_ids, descending=True)


__all__ = ["merge_top", "sort"]
