"""Which implementation a kernel entry point runs: `impl = "auto" | "xla" | "pallas"`, and for which platform.

  xla     the plain-JAX path (memory-bounded where the kernel is, e.g. chunked over queries); runs anywhere.
  pallas  the Pallas kernel; compiled on GPU/TPU, run with `interpret=True` on CPU (slow, for tests).
  auto    pallas where it compiles (GPU, TPU), xla elsewhere.

On a GPU the kernels go through Pallas' Triton lowering: jax 0.10.2 defaults to Mosaic GPU, whose generic
(non-warpgroup) lowering cannot gather rows through an index array, which every kernel here does.

`lowering_for(platform)` traces the kernels for another platform than the default backend, so that a CPU
machine can check that they lower: `with lowering_for("gpu"): jax.jit(f).trace(*args).lower(
lowering_platforms=("cuda",))` raises on any operation Pallas cannot lower to Triton.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

IMPLS = ("auto", "xla", "pallas")
PLATFORMS = ("gpu", "tpu")

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_target", default=None)


@contextlib.contextmanager
def lowering_for(platform: str):
    """Kernels traced in this context are built for `platform` ("gpu" or "tpu"), compiled, not interpreted."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def platform() -> str:
    """The platform kernels are built for: the `lowering_for` target, else the default backend."""
    return _TARGET.get() or jax.default_backend()


def resolve(impl: str) -> str:
    """"xla" or "pallas" for `impl` on the target platform; a clear error for anything else."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if platform() in PLATFORMS else "xla"
    return impl


def interpret() -> bool:
    """Pallas runs in interpret mode where no Pallas lowering exists (CPU)."""
    return platform() not in PLATFORMS


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Triton's launch parameters on a GPU (which also selects the Triton lowering); None elsewhere."""
    if platform() != "gpu":
        return None
    # Imported here, not at the top: loading Pallas' Triton backend is needed only to build GPU kernels, and
    # `import longcat_jax` on a CPU or TPU machine should not pay for it.
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
