"""Activation sharding by logical name: the NNX counterpart of Linen's with_logical_constraint
(docs/architecture.md#logical-axes)."""

from __future__ import annotations

import jax

from sharding.rules import RULES, logical_to_spec


def constrain(x: jax.Array, names: tuple[str | None, ...], rules=RULES) -> jax.Array:
    """Constrain x to the mesh axes its logical names map to under the active mesh.

    Outside a mesh context (`jax.set_mesh`) there is nothing to constrain to and x is returned unchanged;
    under any mesh, CPU included, the constraint is applied, so CPU tests see the same
    sharding as accelerators.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))
