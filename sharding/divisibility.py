"""Every sharded dimension must divide by the mesh axes that shard it (docs/architecture.md#logical-axes).

Inside `jax.jit`, a sharding constraint on a dimension its mesh axes do not divide is not an error: the array
silently ends up replicated (we saw 6 experts on ep=4 come out as `P()`, every device holding them all). So
the resolver's promise "never fall back to replication" needs this check before anything is built:
`resolve_shardings` turns every leaf's logical names into a PartitionSpec under the rules and a mesh
(concrete or `jax.sharding.AbstractMesh`, so a plan can be checked without the hardware) and raises a
one-line ValueError naming the array, the dimension, its size, the logical name and the mesh axis with its
size.

A tree is one of:
  - an `nnx.Module` or `nnx.State`: its Variables' `out_sharding` logical names (sharding/rules.py);
  - a mapping {name: (global shape, logical names)}, e.g. {"batch": ((B, T), ("batch", "seq"))};
  - any other pytree of arrays or ShapeDtypeStructs: their own NamedSharding specs (already resolved).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding

from sharding.rules import RULES, logical_to_spec


class Sharded(NamedTuple):
    """One array's placement: where it is, its global shape, its logical names (None when only the resolved
    spec was given) and its spec with one entry per dimension."""

    path: str
    shape: tuple[int, ...]
    names: tuple[str | None, ...] | None
    spec: tuple[str | tuple[str, ...] | None, ...]


def axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, 'tp' or ('dp', 'ep'))."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(leaf: Sharded, mesh) -> tuple[int, ...]:
    """The per-device shape of a leaf that passed the check: each dimension over its axes' product."""
    return tuple(n // math.prod(mesh.shape[a] for a in axes_of(e)) for n, e in zip(leaf.shape, leaf.spec))


def _leaves(tree, mesh, rules) -> list[Sharded]:
    axis_names = tuple(mesh.axis_names)

    def logical(path, shape, names):
        shape = tuple(int(n) for n in shape)
        names = tuple(names) if names is not None else (None,) * len(shape)
        if len(names) != len(shape):
            raise ValueError(f"{path}: {len(names)} logical names {names} for a {len(shape)}-D shape {shape}")
        spec = tuple(logical_to_spec(names, rules, axis_names))
        return Sharded(path, shape, names, spec + (None,) * (len(shape) - len(spec)))

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if isinstance(tree, nnx.State):
        out = []
        for path, var in nnx.to_flat_state(tree):
            names = var.get_metadata().get("out_sharding")
            out.append(logical(".".join(map(str, path)), var.get_value().shape, names))
        return out
    if isinstance(tree, Mapping) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], tuple)
                                         for v in tree.values()):
        return [logical(str(k), shape, names) for k, (shape, names) in tree.items()]
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        sharding = getattr(x, "sharding", None)
        spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
        shape = tuple(x.shape)
        spec += (None,) * (len(shape) - len(spec))
        out.append(Sharded(jax.tree_util.keystr(path), shape, None, spec))
    return out


def _problem(leaf: Sharded, dim: int, mesh) -> str | None:
    axes = axes_of(leaf.spec[dim])
    sizes = [mesh.shape[a] for a in axes]
    n, k = leaf.shape[dim], math.prod(sizes)
    if n % k == 0:
        return None
    name = f"logical {leaf.names[dim]!r}, " if leaf.names and leaf.names[dim] else ""
    if len(axes) == 1:
        by = f"mesh axis {axes[0]!r} of size {k}"
    else:
        by = f"mesh axes {'x'.join(map(repr, axes))} of size {'x'.join(map(str, sizes))}={k}"
    return f"{leaf.path}: dimension {dim} ({name}size {n}) is not divisible by {by}"


def resolve_shardings(tree, mesh, rules=RULES) -> list[Sharded]:
    """Every leaf of `tree` with its spec under `rules` on `mesh`; raises a one-line ValueError at the first
    dimension its mesh axes do not divide (and counts the others), instead of letting it replicate."""
    leaves = _leaves(tree, mesh, rules)
    problems = [p for leaf in leaves for d in range(len(leaf.shape)) if (p := _problem(leaf, d, mesh))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    return leaves


def check_divisible(tree, mesh, rules=RULES) -> None:
    """Raise ValueError if a sharded dimension of `tree` does not divide by its mesh axes (see module doc)."""
    resolve_shardings(tree, mesh, rules)
