"""Meshes from a string, from the device count (one auto axis) and without devices (abstract, for planning);
when a process joins a multi-host run."""

import jax
import pytest

from sharding import AUTO, MESH_AXES, abstract_mesh, make_mesh, parse_mesh
from sharding.distributed import initialize, multi_process_launch
from sharding.mesh import resolve_sizes


def test_parse_mesh_auto_and_errors():
    assert parse_mesh("dp=auto,tp=2") == {"dp": AUTO, "tp": 2}
    assert parse_mesh(" ep = -1 , tp=4 ") == {"ep": AUTO, "tp": 4}
    with pytest.raises(ValueError, match="at most one mesh axis may be 'auto'"):
        parse_mesh("dp=auto,ep=-1")
    with pytest.raises(ValueError, match="'dp' given twice"):
        parse_mesh("dp=2,dp=4")
    with pytest.raises(ValueError, match="positive integer size or 'auto'"):
        parse_mesh("dp=-2")


def test_auto_axis_takes_what_the_device_count_leaves():
    assert resolve_sizes({"dp": AUTO, "ep": 2, "tp": 2}, 64) == {"dp": 16, "ep": 2, "tp": 2}
    assert resolve_sizes({"tp": 8}, 64) == {"tp": 8}  # no auto axis: unchanged, make_mesh checks the product
    with pytest.raises(ValueError, match=r"the other axes \(3 devices\) do not divide the 8 devices"):
        resolve_sizes({"dp": AUTO, "tp": 3}, 8)


def test_make_mesh_fills_the_auto_axis_from_the_devices():
    mesh = make_mesh(parse_mesh("dp=auto,tp=2"))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"dp": len(jax.devices()) // 2, "pp": 1, "cp": 1, "ep": 1, "tp": 2, "vp": 1}
    assert make_mesh({"ep": AUTO}).shape["ep"] == len(jax.devices())
    # On CPU the device order is jax.devices() order: tp, the last axis, varies fastest
    assert list(mesh.devices.flat) == jax.devices()
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        make_mesh({"dp": 2, "tp": 2})


def test_abstract_mesh_needs_no_devices():
    mesh = abstract_mesh({"dp": 64, "cp": 512})  # far more devices than this machine has
    assert mesh.size == 64 * 512 and mesh.shape["cp"] == 512 and mesh.axis_names == MESH_AXES
    assert abstract_mesh({"dp": AUTO, "tp": 8}, device_count=1024).shape["dp"] == 128
    with pytest.raises(ValueError, match="has an auto axis: give the device count"):
        abstract_mesh({"dp": AUTO})
    with pytest.raises(ValueError, match="needs 16 devices, not 32"):
        abstract_mesh({"dp": 16}, device_count=32)


@pytest.mark.parametrize("env,multi", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),  # one task: nothing to join
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
    ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, True),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False),  # a plain pod, not an indexed Job
])
def test_multi_process_launch_reads_the_launchers(env, multi):
    assert multi_process_launch(env) is multi


def test_initialize_only_joins_a_multi_host_run(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_NUM_SLICES", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert initialize() is False and calls == []
    with pytest.raises(ValueError, match="give coordinator_address, num_processes and process_id together"):
        initialize(num_processes=2)
    assert initialize("10.0.0.1:1234", 2, 1) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert initialize() is True  # jax fills in the rest from Slurm's variables
    assert calls[-1] == {"coordinator_address": None, "num_processes": None, "process_id": None}
