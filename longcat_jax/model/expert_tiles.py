"""Grouped SwiGLU over expert-sorted rows, for backends without a native grouped matmul (XLA:CPU).

XLA:CPU lowers `lax.ragged_dot` to a dense matmul over every expert (E times the work). Here the sorted rows
are cut into tiles of `tile` consecutive rows of one expert, and a loop runs only the tiles that hold rows
(their count is known at run time only). Nothing is dropped and nothing is padded beyond the last partial tile
of each expert. The forward picks the tile's expert with a switch over one branch per expert, so each branch
slices its weights at a constant index: where the stacked weights are themselves a stack of separate arrays
(the serving step's per-expert parameters), XLA folds the slice and the matmuls read the parameter in place;
a run-time index would copy the expert's weights out first, which costs as much as the matmuls of a
few-row decode tile.

    y[i] = (silu(xs[i] @ w_gate[e]) * (xs[i] @ w_up[e])) @ w_down[e]     for sorted row i of expert e

A loop with a run-time trip count has no autodiff, so the backward pass is written out: it walks the same
tiles, in the same order, and adds each tile's weight gradient into its expert's slot in f32, one slot per
update in a fixed order (no colliding scatter-add): the gradients are deterministic
(docs/architecture.md#determinism).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longcat_jax.model.layers import swiglu_backward
from pallas_kernels.cpu_serving import matmul


def _tile_plan(starts, tile: int, max_tiles: int):
    """Tiles of `tile` sorted rows, each inside one expert, in row order.

    Returns (count, expert, row0, rows): count is the number of tiles in use (a scalar); the rest are
    [max_tiles] int32 arrays: the tile's expert, its first sorted row, and how many of its rows are that
    expert's (the others, up to `tile`, belong to later experts or lie past the end and are masked).
    """
    n_experts = starts.shape[0] - 1
    sizes = starts[1:] - starts[:-1]
    per_expert = -(-sizes // tile)
    ends = jnp.cumsum(per_expert)  # one past each expert's last tile
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(ends, t, side="right"), n_experts - 1).astype(jnp.int32)
    offset = (t - (ends - per_expert)[expert]) * tile
    return ends[-1], expert, starts[expert] + offset, jnp.minimum(sizes[expert] - offset, tile)


def _masked_write(buf, value, row0, keep):
    """buf[row0 : row0 + tile] = value where keep [tile, 1], else unchanged."""
    old = jax.lax.dynamic_slice_in_dim(buf, row0, value.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, value, old), row0, 0)


def _forward(xs, starts, w_gate, w_up, w_down, tile):
    m, d = xs.shape
    f = w_gate.shape[-1]
    count, expert, row0, rows = _tile_plan(starts, tile, m // tile + w_gate.shape[0])
    xs = jnp.concatenate([xs, jnp.zeros((tile, d), xs.dtype)])  # so the last tile never reads past the end

    def expert_ffn(e, x):  # e static: its weights are a constant slice, which XLA can read in place
        g, u = matmul(x, w_gate[e]), matmul(x, w_up[e])
        return matmul(jax.nn.silu(g) * u, w_down[e]), g, u

    branches = [functools.partial(expert_ffn, e) for e in range(w_gate.shape[0])]

    def body(t, carry):
        r0 = row0[t]
        keep = (jnp.arange(tile) < rows[t])[:, None]
        x = jax.lax.dynamic_slice_in_dim(xs, r0, tile)
        new = jax.lax.switch(expert[t], branches, x)
        return tuple(_masked_write(buf, value, r0, keep) for buf, value in zip(carry, new))

    zeros = functools.partial(jnp.zeros, dtype=xs.dtype)
    y, g_all, u_all = jax.lax.fori_loop(0, count, body, (zeros((m + tile, d)), zeros((m + tile, f)),
                                                         zeros((m + tile, f))))
    return y[:m], (xs, g_all, u_all)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def tiled_expert_ffn(xs, starts, w_gate, w_up, w_down, tile: int = 64):
    """Grouped SwiGLU of expert-sorted rows, exactly what `lax.ragged_dot` computes per group.

    Args:
      xs: [M, D] rows sorted by expert.
      starts: [E+1] int32, first row of each expert; rows from starts[E] on belong to no expert.
      w_gate, w_up: [E, D, F]; w_down: [E, F, D]; all in xs's dtype.
      tile: rows per tile (static).
    Returns:
      [M, D] in xs's dtype, zero in rows past starts[E].
    """
    return _forward(xs, starts, w_gate, w_up, w_down, tile)[0]


def _fwd(xs, starts, w_gate, w_up, w_down, tile):
    y, (xs_padded, g_all, u_all) = _forward(xs, starts, w_gate, w_up, w_down, tile)
    return y, (xs_padded, g_all, u_all, starts, w_gate, w_up, w_down)


def _bwd(tile, res, dy):
    xs, g_all, u_all, starts, w_gate, w_up, w_down = res
    m = dy.shape[0]
    count, expert, row0, rows = _tile_plan(starts, tile, m // tile + w_gate.shape[0])
    dy = jnp.concatenate([dy, jnp.zeros((tile, dy.shape[1]), dy.dtype)])
    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)

    def body(t, carry):
        dxs, dwg, dwu, dwd = carry
        e, r0 = expert[t], row0[t]
        keep = (jnp.arange(tile) < rows[t])[:, None]
        # Rows of other experts get a zero cotangent, so they add nothing to this expert's weight gradients.
        dout = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dy, r0, tile), 0)
        x = jax.lax.dynamic_slice_in_dim(xs, r0, tile)
        g = jax.lax.dynamic_slice_in_dim(g_all, r0, tile)
        u = jax.lax.dynamic_slice_in_dim(u_all, r0, tile)
        dx, dg, du, a = swiglu_backward(g, u, w_gate[e], w_up[e], w_down[e], dout)

        def accumulate(acc, a, b):
            return acc.at[e].add(jnp.matmul(a.T, b, preferred_element_type=jnp.float32))

        return (_masked_write(dxs, dx, r0, keep), accumulate(dwg, x, dg), accumulate(dwu, x, du),
                accumulate(dwd, a, dout))

    dxs, dwg, dwu, dwd = jax.lax.fori_loop(
        0, count, body, (jnp.zeros_like(xs), f32(w_gate.shape), f32(w_up.shape), f32(w_down.shape)))
    return (dxs[:m], None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype))


tiled_expert_ffn.defvjp(_fwd, _bwd)
