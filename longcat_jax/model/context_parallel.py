"""Context parallelism (CP): the token axis split over the mesh axis of `seq` in a load-balanced causal layout
(docs/architecture.md#context-parallel).

A row of T tokens is cut into 2 cp chunks of C = T / (2 cp) tokens, and shard i holds chunks i and 2cp-1-i,
an early and a late one, so that every shard's queries see about as many causal keys as any other's. For
T = 8 and cp = 2 the row [0..7] is laid out as [0, 1, 6, 7 | 2, 3, 4, 5]. `forward` moves the hidden state,
the positions and the document ids into this layout before the layers (`Layout.from_natural`: chunks travel
by `ppermute`) and back after them, so the LM head, the losses and MTP see natural order.

Inside the layers only attention needs to know. Every mask is defined by positions and document ids, never by
array index, and the token-wise rest (norms, MLPs, MoE) does not care where a token sits. Attention keeps its
queries split and all-gathers its keys on purpose (`Layout.gather`: the MLA latents, 576 values per token for
LongCat-2.0, and the indexer keys). What reads keys by row runs per chunk of queries over the keys put back in
natural order (`per_chunk`), as a chunk of new tokens attends over a cache: the SI window read as the band of
rows before a chunk, HI's key index sorted by (document, position) and lax.top_k's tie-break to the lower row
then see exactly what one device sees, whatever the chunk length. Selections leave as rows of the keys in
layout order (`Layout.to_layout_rows`), which is how everything else reads them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding.constrain import constrain
from sharding.rules import split_axis


def balanced_chunks(cp: int) -> tuple[int, ...]:
    """The natural chunk at each of the 2 cp places of the balanced layout: shard i holds places 2i and 2i+1,
    which hold chunks i and 2cp-1-i."""
    return tuple(c for i in range(cp) for c in (i, 2 * cp - 1 - i))


def check_length(T: int, cp: int) -> None:
    """Raise ValueError unless the balanced layout's 2 cp chunks split a row of T tokens evenly."""
    if T % (2 * cp):
        raise ValueError(f"sequence length {T} is not divisible by 2 x cp = {2 * cp}: context parallelism "
                         f"over a mesh axis of size {cp} cuts each row into 2 x cp equal chunks")


def balance_order(T: int, cp: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, inverse), int [T] each: place j of the balanced layout holds natural token perm[j], and natural
    token n sits at place inverse[n] (x[:, perm] lays a row out, y[:, inverse] puts it back)."""
    check_length(T, cp)
    return _token_order(balanced_chunks(cp), T)


def _token_order(order: tuple[int, ...], T: int) -> tuple[np.ndarray, np.ndarray]:
    C = T // len(order)
    perm = (np.asarray(order)[:, None] * C + np.arange(C)).reshape(-1)
    return perm, np.argsort(perm)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the chunks of a row of `length` tokens sit: place p (of 2 cp) holds natural chunk order[p], and
    shard i of the mesh axis `axis` holds places 2i and 2i+1. Static (hashable): `block.Context.cp`."""

    order: tuple[int, ...]
    length: int
    axis: str  # the mesh axis the rules give `seq`
    rules: tuple  # the logical -> mesh table the model runs under

    @property
    def cp(self) -> int:
        return len(self.order) // 2

    @property
    def chunk(self) -> int:
        return self.length // len(self.order)

    def natural(self) -> Layout:
        """The same split in natural order (shard i holds chunks 2i and 2i+1): what MTP runs in."""
        return dataclasses.replace(self, order=tuple(range(len(self.order))))

    def from_natural(self, x):
        """x [B, T, ...] in natural order, split over `axis` -> the same tokens in this layout."""
        return _relayout(x, self.natural().order, self.order, self.axis)

    def to_natural(self, x):
        """The inverse of `from_natural`."""
        return _relayout(x, self.order, self.natural().order, self.axis)

    def gather(self, x, names: tuple[str | None, ...]):
        """x [B, T, ...] with logical `names`, constrained whole along `seq` on every shard (the keys'
        deliberate all-gather); the other axes keep their rules."""
        return constrain(x, tuple(None if n == "seq" else n for n in names), self.rules)

    def to_layout_rows(self, rows):
        """int rows (any shape, -1 = none) of a row of tokens in natural order -> their rows in this
        layout."""
        return self._map_rows(rows, _token_order(self.order, self.length)[1])

    def to_natural_rows(self, rows):
        """The inverse of `to_layout_rows`."""
        return self._map_rows(rows, _token_order(self.order, self.length)[0])

    def _map_rows(self, rows, table):
        if self.order == self.natural().order:
            return rows
        table = jnp.asarray(table, jnp.int32)
        return jnp.where(rows < 0, -1, table[jnp.clip(rows, 0, self.length - 1)])


def balanced_layout(T: int, rules) -> Layout | None:
    """The balanced layout of rows of T tokens under the active mesh (`jax.set_mesh`), or None where `seq` is
    not split (no mesh, `seq` unmapped, or its mesh axis of size 1). Raises ValueError when `seq` maps to
    several mesh axes or T is not a multiple of 2 cp."""
    mesh = jax.sharding.get_abstract_mesh()
    axis = split_axis("seq", rules, mesh, "context parallelism splits the sequence")
    if axis is None:
        return None
    cp = mesh.shape[axis]
    check_length(T, cp)
    return Layout(balanced_chunks(cp), T, axis, tuple(rules))


def _relayout(x, src: tuple[int, ...], dst: tuple[int, ...], axis: str):
    """x [B, T, ...] split over `axis`, its chunks moved from the places `src` gives them to those of `dst`:
    each shard sends and receives two chunks by `ppermute` (XLA would gather the whole row for a reordering
    gather)."""
    if src == dst:
        return x
    place = {chunk: p for p, chunk in enumerate(src)}
    cp = len(src) // 2

    def move(local):  # [B, 2C, ...]: this shard's two places
        C = local.shape[1] // 2
        have = (local[:, :C], local[:, C:])
        out = []
        for slot in range(2):
            # Shard d's place 2d + slot gets its chunk from place 2 * shard + from_slot of `src`.
            sources = [divmod(place[dst[2 * d + slot]], 2) for d in range(cp)]
            parts = []
            for from_slot in range(2):
                pairs = [(shard, d) for d, (shard, s) in enumerate(sources) if s == from_slot]
                if pairs:  # the shards outside `pairs` receive zeros, so the parts add up
                    parts.append(jax.lax.ppermute(have[from_slot], axis, pairs))
            out.append(sum(parts[1:], parts[0]))
        return jnp.concatenate(out, axis=1)

    return jax.shard_map(move, in_specs=P(None, axis), out_specs=P(None, axis), axis_names={axis})(x)


def per_chunk(layout: Layout, fn, queries, keys):
    """fn once per chunk of queries over every key in natural order; the results come back in `layout`.

    queries: a pytree of [B, T, ...] arrays in `layout`, split over its axis. keys: a pytree of [B, T, ...]
    arrays in `layout` (the gathered keys, their positions and documents), whole on every shard. Inside a
    `shard_map` over the axis, each shard runs fn(chunk_queries, natural_keys, offset) on its two chunks
    (vmapped): chunk_queries [B, C, ...]; natural_keys the keys in natural order; offset the natural row of
    the chunk's first token, as for a chunk of new tokens over a cache of T rows. fn returns a pytree of
    [B, C, ...] arrays, which come back [B, T, ...] in `layout`, split over the axis. Axes other than
    `layout.axis` stay automatic inside.
    """
    axis, C = layout.axis, layout.chunk
    order = jnp.asarray(layout.order, jnp.int32)
    places = [layout.order.index(chunk) for chunk in layout.natural().order]  # where each natural chunk is

    def in_natural_order(x):  # every shard holds all T rows
        return jnp.concatenate([x[:, p * C:(p + 1) * C] for p in places], axis=1)

    def local(queries, keys):
        keys = jax.tree.map(in_natural_order, keys)
        offsets = order[2 * jax.lax.axis_index(axis) + jnp.arange(2)] * C
        chunks = jax.tree.map(lambda x: x.reshape(x.shape[0], 2, C, *x.shape[2:]), queries)
        out = jax.vmap(lambda q, offset: fn(q, keys, offset), in_axes=(1, 0), out_axes=1)(chunks, offsets)
        return jax.tree.map(lambda y: y.reshape(y.shape[0], 2 * C, *y.shape[3:]), out)

    # check_vma=False: the kernels mix split and whole values without marking them (pvary). No collective
    # runs inside, and the transpose still sums the whole keys' cotangents over the shards.
    return jax.shard_map(local, in_specs=(P(None, axis), P()), out_specs=P(None, axis), axis_names={axis},
                         check_vma=False)(queries, keys)


def query_mean(layout: Layout, fn, queries, keys, query_mask=None):
    """The mean over every query of a row, from `fn`'s means over the queries of one shard.

    fn(local_queries, keys, local_mask) returns a scalar, the mean over its [B, T / cp] queries that count
    (local_mask [B, T / cp], 1 = counts, or None = all). queries, keys and the axis as for `per_chunk`, the
    keys in `layout`. Each shard's mean is weighted by its count of queries, so the result is the mean one
    device takes over the whole row.
    """
    axis = layout.axis

    def local(queries, keys, mask):  # -> [1, 2]: this shard's (sum, count)
        value = fn(queries, keys, mask)
        rows = math.prod(jax.tree.leaves(queries)[0].shape[:2])
        count = jnp.float32(rows) if mask is None else mask.astype(jnp.float32).sum()
        return jnp.stack([value * jnp.maximum(count, 1.0), count])[None]

    # The shards' sums are added outside: a psum inside would need check_vma, which the kernels do not pass.
    parts = jax.shard_map(local, in_specs=(P(None, axis), P(), P(None, axis)), out_specs=P(axis),
                          axis_names={axis}, check_vma=False)(queries, keys, query_mask)
    total, count = parts.sum(axis=0)
    return total / jnp.maximum(count, 1.0)
