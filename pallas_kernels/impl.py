"""Which implementation a kernel entry point runs: `impl = "auto" | "xla" | "pallas"`.

  xla     the plain-JAX path (memory-bounded where the kernel is, e.g. chunked over queries); runs anywhere.
  pallas  the Pallas kernel; compiled on GPU/TPU, run with `interpret=True` on CPU (slow, for tests).
  auto    pallas where it compiles (GPU, TPU), xla elsewhere.
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "pallas")


def resolve(impl: str) -> str:
    """"xla" or "pallas" for `impl` on the default backend; a clear error for anything else."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    return impl


def interpret() -> bool:
    """Pallas runs in interpret mode where no Pallas lowering exists (CPU)."""
    return jax.default_backend() not in ("gpu", "tpu")
