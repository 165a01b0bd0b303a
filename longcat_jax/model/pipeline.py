"""Pipeline parallelism over the stacked decoder layers (docs/architecture.md#pipeline).

A GPipe schedule in SPMD form, after MaxText's layers/pipeline.py. The mesh axis that the rules give the
logical `layers` axis is the stage axis: its S devices each hold L/S consecutive layers (the stacked
parameters' own sharding, so nothing is gathered). The batch is split into M microbatches along its rows,
and M + S - 1 iterations run as one `lax.scan` inside a `shard_map` that is manual over the stage axis only
(data, tensor and expert parallelism stay automatic inside):

    iteration i: stage 0 takes microbatch i; every stage s runs its layers on microbatch i - s (an inner
                 scan, remat per layer); `ppermute` hands each stage's output to stage s + 1.

Stage s idles (a bubble) in the iterations where i - s is outside [0, M): it computes on a stand-in whose
result reaches neither an output nor a gradient. Bubble fraction (S - 1) / (M + S - 1).

The per-layer statistics come out as the whole batch would give them: expert loads are summed over the
microbatches, and the statistics that are means over the counted tokens (indexer KL and recall) are
weighted by each microbatch's token count. The balance loss, a product of two batch means, is the one that
is not exact: it is the token-weighted mean of the microbatches' own balance losses (as gradient
accumulation computes it), so it equals the whole batch's only with M = 1. With a capacity factor the MoE
drops tokens per microbatch, as under gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longcat_jax.model.block import Context
from sharding.rules import logical_to_spec, split_axis

# The Context fields with a leading batch axis, split with the activations (the full-sequence forward sets
# no cache fields).
_BATCHED = ("positions", "segment_ids")


def stage_axis(rules, mesh=None) -> str | None:
    """The mesh axis the stacked layers are split over on `mesh` (default: the active one, `jax.set_mesh`),
    when it has more than one device: the pipeline's stages. None without a mesh or when `layers` is
    unsharded."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return split_axis("layers", rules, mesh, "the pipeline runs its stages")


def bubble_fraction(stages: int, microbatches: int) -> float:
    """The share of stage-iterations that idle: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def stages(rules, mesh) -> int:
    """The pipeline stages of `mesh` (None: no mesh): the size of the stage axis, 1 without a pipeline."""
    axis = None if mesh is None else stage_axis(rules, mesh)
    return 1 if axis is None else mesh.shape[axis]


def check_microbatches(batch: int, microbatches: int, batch_shards: int = 1):
    """Raise ValueError unless `microbatches` splits each of the `batch_shards` blocks of the batch's rows
    evenly (each device then keeps its own rows in every microbatch)."""
    if microbatches < 1 or batch % (microbatches * batch_shards):
        raise ValueError(f"{microbatches} microbatches must divide the rows of each of the {batch_shards} "
                         f"shards of the batch ({batch} rows in all)")


def run(layer_fn: Callable, state, h: jax.Array, ctx: Context, axis: str, microbatches: int, rules,
        remat=None):
    """The stacked layers as a pipeline over mesh axis `axis`; the same results as scanning them in order.

    Args:
      layer_fn: (one layer's state, h [b, T, D], Context of those rows) -> (h, aux dict of scalars and
        [slots] loads).
      state: the stacked layers' parameters, every leaf [L, ...] with L split over `axis`.
      h: [B, T, D] the embedded batch; ctx: its Context (no cache).
      microbatches: M, dividing the rows that each shard of the batch holds.
      rules: the logical -> mesh table (where the batch's rows are sharded).
      remat: None or a jax.checkpoint policy for each layer.
    Returns:
      (h [B, T, D] after the last layer, aux stacked on [L] as a scan over the whole batch gives it).
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = logical_to_spec(("batch",), rules, mesh.axis_names)[0]
    batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    check_microbatches(h.shape[0], microbatches, math.prod(mesh.shape[a] for a in batch_axes))
    batched = {name: getattr(ctx, name) for name in _BATCHED if getattr(ctx, name) is not None}
    per_device = _per_device(layer_fn, ctx, axis, mesh.shape[axis], microbatches, remat)
    # check_vma=False: jnp.searchsorted (the MoE's expert sort) fails to trace on values that vary over a
    # manual axis in jax 0.10.2. The output is replicated by construction (a psum).
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P(), P(), P()), out_specs=(P(), P(axis)),
                         axis_names={axis}, check_vma=False)(state, h, batched, ctx.inv_freq)


def _per_device(layer_fn, ctx: Context, axis: str, S: int, M: int, remat):
    """The per-device body of `run`: (local state [L/S, ...], h, batched Context arrays, inv_freq) ->
    (h after every stage, this stage's aux [L/S, ...])."""

    def stage_layers(local_state, x, c: Context):
        """This stage's layers on one microbatch x [b, T, D]: (y, aux stacked on [L/S])."""

        def body(x, layer_state):
            return layer_fn(layer_state, x, c)

        if remat is not None:
            body = jax.checkpoint(body, policy=remat, prevent_cse=False)
        return jax.lax.scan(body, x, local_state)

    def stages(local_state, h, batched, inv_freq):
        stage = jax.lax.axis_index(axis)
        xs = split(h, M)  # [M, b, T, D]
        parts = {name: split(v, M) for name, v in batched.items()}

        def iteration(carry, i):
            m = jnp.clip(i - stage, 0, M - 1)  # the microbatch this stage holds (a stand-in in a bubble)
            x = jnp.where(stage == 0, xs[m], carry)
            c = dataclasses.replace(ctx, inv_freq=inv_freq, **{k: v[m] for k, v in parts.items()})
            y, aux = stage_layers(local_state, x, c)
            # The last stage sends nothing on: its outputs are collected from the scan's ys.
            nxt = jax.lax.ppermute(y, axis, [(s, s + 1) for s in range(S - 1)])
            return nxt, (y, aux)

        _, (ys, auxs) = jax.lax.scan(iteration, jnp.zeros_like(xs[0]), jnp.arange(M + S - 1))
        # The last stage finishes microbatch m in iteration m + S - 1; the others' rows are zeroed so that the
        # sum over stages hands every device the last stage's result.
        out = jnp.where(stage == S - 1, merge(ys[S - 1:]), 0)
        # Stage s holds microbatch m in iteration m + s.
        mine = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, stage, M, 0), auxs)
        return jax.lax.psum(out, axis), combine_aux(mine, token_counts(parts, xs.shape))

    return stages


def split(x: jax.Array, M: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...]: microbatch m holds rows m, m + M, m + 2M, ... so that a batch sharded in
    contiguous blocks of rows keeps every row on its device."""
    return x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1)


def merge(x: jax.Array) -> jax.Array:
    """The inverse of `split`: [M, B/M, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def token_counts(parts: dict, shape) -> jax.Array:
    """The tokens each microbatch's means run over, [M] f32: its non-padding tokens with segment ids (the
    layers' query mask), else all of its b * T."""
    if "segment_ids" in parts:
        return (parts["segment_ids"] > 0).sum((1, 2)).astype(jnp.float32)
    return jnp.full((shape[0],), shape[1] * shape[2], jnp.float32)


def combine_aux(aux: dict, counts: jax.Array) -> dict:
    """Per-microbatch statistics [M, L/S, ...] -> the whole batch's [L/S, ...]: expert loads summed, the
    means over tokens weighted by the microbatches' token counts `counts` [M] (a batch with no counted
    token gives 0, as the masked means do)."""
    weights = counts / jnp.maximum(counts.sum(), 1.0)

    def one(name, a):
        if name == "expert_load":
            return a.sum(0)
        return (weights.reshape(-1, *(1,) * (a.ndim - 1)) * a).sum(0)

    return {name: one(name, a) for name, a in aux.items()}
