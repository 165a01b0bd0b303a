"""The measured matmul rate of the device: the yardstick for model-FLOPs utilisation."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_rates(n: int, reps: int, dtype=jnp.float32) -> list[float]:
    """FLOP/s of `reps` jitted [n, n] @ [n, n] products in `dtype`, after one compile-and-warm-up run."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return rates
