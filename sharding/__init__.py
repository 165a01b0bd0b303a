"""Mesh construction, the logical-to-mesh rules table, the divisibility check and the activation constraint
helper."""

from sharding.constrain import constrain
from sharding.divisibility import check_divisible, resolve_shardings
from sharding.mesh import AUTO, abstract_mesh, make_mesh, parse_mesh
from sharding.rules import LOGICAL_AXES, MESH_AXES, RULES, logical_to_spec, override_rules

__all__ = ["AUTO", "LOGICAL_AXES", "MESH_AXES", "RULES", "abstract_mesh", "check_divisible", "constrain",
           "logical_to_spec", "make_mesh", "override_rules", "parse_mesh", "resolve_shardings"]
