"""Device meshes: the only place that knows device counts (docs/architecture.md#logical-axes).

A mesh is given as axis sizes, from a string (`--mesh dp=2,ep=2,tp=2`) or a dict. One axis may be `auto`
(or -1, MaxText's `ici_*_parallelism=-1`): it takes whatever the device count leaves once the other axes are
placed. Across hosts the same code applies once `jax.distributed.initialize` has run
(sharding/distributed.py): `jax.devices()` then lists every process's devices and the mesh spans them all.
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np

from sharding.rules import MESH_AXES

AUTO = -1  # the axis size that is filled from the device count


def parse_mesh(text: str) -> dict[str, int]:
    """Parse 'dp=2,tp=2' into {'dp': 2, 'tp': 2}; 'dp=auto' (or dp=-1) gives {'dp': AUTO}.

    Unknown axes, repeated axes, bad sizes and more than one auto axis raise ValueError."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = (s.strip() for s in part.partition("="))
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {text!r}; known: {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
        if value in ("auto", "-1"):
            sizes[name] = AUTO
        elif value.isdigit() and int(value) >= 1:
            sizes[name] = int(value)
        else:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size or 'auto', got {value!r}")
    if list(sizes.values()).count(AUTO) > 1:
        raise ValueError(f"at most one mesh axis may be 'auto', got {text!r}")
    return sizes


def resolve_sizes(sizes: dict[str, int] | None, device_count: int) -> dict[str, int]:
    """Axis sizes with an AUTO axis filled so that the product is device_count.

    Without an AUTO axis the sizes come back unchanged (make_mesh checks the product). An AUTO axis that
    cannot be filled (the other axes do not divide the device count) raises ValueError."""
    sizes = dict(sizes or {})
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; known: {', '.join(MESH_AXES)}")
        if size != AUTO and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis {name!r} needs a positive integer size or AUTO, got {size!r}")
    auto = [name for name, size in sizes.items() if size == AUTO]
    if len(auto) > 1:
        raise ValueError(f"at most one mesh axis may be auto, got {', '.join(auto)}")
    if auto:
        fixed = math.prod(size for size in sizes.values() if size != AUTO)
        if device_count % fixed:
            raise ValueError(f"mesh {describe(sizes)}: the other axes ({fixed} devices) do not divide the "
                             f"{device_count} devices, so {auto[0]!r} cannot be filled")
        sizes[auto[0]] = device_count // fixed
    return sizes


def describe(sizes: dict[str, int]) -> str:
    """'dp=2,ep=auto,tp=2' in MESH_AXES order (the --mesh syntax), for messages and reports."""
    parts = [f"{a}={'auto' if sizes[a] == AUTO else sizes[a]}" for a in MESH_AXES if a in sizes]
    return ",".join(parts) or "(one device)"


def make_mesh(sizes: dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
    """A mesh over all MESH_AXES (absent axes have size 1); one axis may be AUTO, and the product must equal
    the device count (all of `jax.devices()`, every host's after `jax.distributed.initialize`)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_sizes(sizes, len(devices))
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {describe(sizes)} needs {math.prod(shape)} devices, have {len(devices)}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        # jax.make_mesh orders devices by the physical topology (TPU torus, GPU ids), so the fastest-varying
        # axes (tp, vp) land on the closest devices; our own count check above keeps it from dropping devices.
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        # Some TPU shapes cannot be laid on the torus without splitting a physical axis; the plain device
        # order still gives a correct (if slower) mesh, so prefer it to refusing the run, and say so.
        warnings.warn(f"mesh {describe(sizes)}: no topology-aware device order ({e}); using the plain order",
                      stacklevel=2)
        return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def abstract_mesh(sizes: dict[str, int] | None = None, device_count: int | None = None
                  ) -> jax.sharding.AbstractMesh:
    """A device-free mesh of the given sizes, for planning (shard shapes, memory) without the hardware.

    An AUTO axis needs device_count; without one the device count is the product of the sizes."""
    if AUTO in (sizes or {}).values() and device_count is None:
        raise ValueError(f"mesh {describe(sizes or {})} has an auto axis: give the device count")
    sizes = resolve_sizes(sizes, device_count or math.prod((sizes or {}).values()))
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if device_count is not None and math.prod(shape) != device_count:
        raise ValueError(f"mesh {describe(sizes)} needs {math.prod(shape)} devices, not {device_count}")
    return jax.sharding.AbstractMesh(shape, MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
