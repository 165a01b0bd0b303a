"""Joining a multi-host run: when to call `jax.distributed.initialize` (docs/architecture.md#logical-axes).

JAX runs one Python process per host (or per GPU); each must call `jax.distributed.initialize` before its
first JAX computation, and from then on `jax.devices()` lists every process's devices, so
`sharding.make_mesh` builds one mesh over the whole cluster. With no arguments JAX fills in the coordinator,
process count and process id itself under Slurm, Open MPI, Cloud TPU / GKE TPU and (with the `kubernetes`
package) Kubernetes indexed Jobs and JobSets; `JAX_COORDINATOR_ADDRESS` overrides the coordinator.

What JAX cannot tell by itself is whether this process is alone: calling `initialize()` on a plain one-host
run fails for want of a coordinator. `multi_process_launch` reads the launchers' variables to decide, so a
script can call `initialize()` unconditionally at its top.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1"))
    except ValueError:
        return 1


def multi_process_launch(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment says this process is one of several that must join one JAX run."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:  # srun --ntasks N
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:  # mpirun -np N
        return True
    if "," in env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES", "")):  # TPU slice of hosts
        return True
    if _count(env, "MEGASCALE_NUM_SLICES") > 1:  # multi-slice TPU
        return True
    # Kubernetes indexed Job / JobSet: each pod has its completion index
    return "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the multi-host run when there is one; returns whether it did. Call before any other JAX call.

    Explicit arguments always initialise (a launcher JAX does not detect); otherwise JAX's own cluster
    detection supplies them when `multi_process_launch()` says this process has peers.
    """
    given = (coordinator_address, num_processes, process_id)
    detected = multi_process_launch()
    if all(v is None for v in given) and not detected:
        return False
    if any(v is None for v in given) and not detected:
        raise ValueError("jax.distributed: no launcher detected; give coordinator_address, num_processes and "
                         "process_id together")
    # XLA:CPU runs cross-process collectives only through gloo (GPU and TPU bring their own and ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def is_primary() -> bool:
    """The process that writes a run's own files (logs, settings, summary); checkpoints are written by all."""
    return jax.process_index() == 0
