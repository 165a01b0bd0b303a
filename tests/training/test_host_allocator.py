"""keep_freed_host_memory: a rerun of a compiled XLA:CPU program stops page-faulting its temporaries in."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each run of `f` holds two 36 MiB temporaries, above glibc's largest mmap threshold (32 MiB), as a training
# step's biggest buffers are. Printed: the minor page faults per rerun over 20 reruns after 20 warm ones (the
# heap may still grow once in a while as blocks fragment; it does not shrink).
_FAULTS_PER_RERUN = """
import resource, sys
from longcat_jax.training.host_allocator import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    y = jax.lax.optimization_barrier(jnp.sin(x))
    z = jax.lax.optimization_barrier(jnp.cos(y))
    return (y * z).sum()

x = jnp.ones((3072, 3072))
for _ in range(20):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_rerun(mode: str) -> float:
    # As train.py runs: one CPU device, no persistent compilation cache (this suite's conftest sets both).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_RERUN, mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc malloc's")
def test_reruns_reuse_freed_memory():
    kept, default = _faults_per_rerun("keep"), _faults_per_rerun("default")
    # Without the setting every rerun maps both temporaries afresh: 2 x 36 MiB / 4 KiB = 18,432 faults.
    assert default > 9000, default
    assert kept < default / 4, (kept, default)
