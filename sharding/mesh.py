"""Device meshes: the only place that knows device counts."""

from __future__ import annotations

import jax
import numpy as np

from sharding.rules import MESH_AXES


def parse_mesh(text: str) -> dict[str, int]:
    """Parse 'dp=2,tp=2' into {'dp': 2, 'tp': 2}; unknown axes or bad sizes raise ValueError."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {text!r}; known: {', '.join(MESH_AXES)}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {value!r}")
        sizes[name] = int(value)
    return sizes


def make_mesh(sizes: dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
    """A mesh over all MESH_AXES (absent axes have size 1); the product must equal the device count."""
    sizes = dict(sizes or {})
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {sizes} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
