"""FSDP placement (`train.py --fsdp`, docs/architecture.md#logical-axes): every parameter's model width also
split over dp, so each device stores 1/dp of it and XLA gathers a layer's weights when the layer runs."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding

from sharding.divisibility import check_divisible
from sharding.rules import logical_to_spec, override_rules

FSDP_RULES = override_rules("embed=dp")


def fully_sharded(params: nnx.State, mesh) -> nnx.State:
    """params placed under FSDP_RULES. Only the parameters move: the model keeps the default rules for its
    activations, whose width stays whole (their batch is on dp already)."""
    check_divisible(params, mesh, FSDP_RULES)
    for _, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
        spec = logical_to_spec(tuple(names), FSDP_RULES)
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
    return params
