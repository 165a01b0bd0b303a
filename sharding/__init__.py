"""Mesh construction, the logical-to-mesh rules table and the activation constraint helper."""

from sharding.constrain import constrain
from sharding.mesh import make_mesh, parse_mesh
from sharding.rules import LOGICAL_AXES, MESH_AXES, RULES, logical_to_spec

__all__ = ["LOGICAL_AXES", "MESH_AXES", "RULES", "constrain", "logical_to_spec", "make_mesh", "parse_mesh"]
