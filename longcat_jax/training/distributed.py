"""Multi-process runs through JAX's multi-controller runtime (`jax.distributed.initialize`): every process
runs the same program on its own devices, and the mesh spans all of them.

train.py starts it from `--coordinator HOST:PORT --num-processes N --process-id I`, or, with `--distributed`
or a JAX_COORDINATOR_ADDRESS in the environment, lets JAX read what a cluster manager sets (SLURM, Open MPI,
Cloud TPU, Kubernetes). It must run before anything asks for devices.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               from_environment: bool) -> bool:
    """Join the run's processes; False (nothing done) for a single-process run."""
    explicit = (coordinator, num_processes, process_id)
    from_environment = from_environment or "JAX_COORDINATOR_ADDRESS" in os.environ
    if all(v is None for v in explicit) and not from_environment:
        return False
    # XLA:CPU runs cross-process collectives only through gloo (GPU and TPU bring their own, and ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def is_primary() -> bool:
    """The process that writes the run's files (logs, settings, summary); checkpoints are written by all."""
    return jax.process_index() == 0
