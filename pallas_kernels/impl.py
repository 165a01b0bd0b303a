"""Which implementation a kernel entry point runs: `impl = "auto" | "xla" | "pallas"`, and for which platform.

  xla     the plain-JAX path (memory-bounded where the kernel is, e.g. chunked over queries); runs anywhere.
  pallas  the Pallas kernel; compiled on GPU/TPU, run with `interpret=True` on CPU (slow, for tests).
  auto    pallas where it compiles (GPU, TPU), xla elsewhere.

Which Pallas kernel "pallas" means is decided here, once (`backend()`), and each entry point dispatches on it:

  triton  on a GPU, and on CPU by default (interpret=True): the kernels in `<op>.py`. jax 0.10.2 defaults
          to Mosaic GPU, whose generic (non-warpgroup) lowering cannot gather rows through an index array,
          which every kernel here does, so the Triton lowering is requested explicitly.
  mosaic  on a TPU: the kernels in `tpu_<op>.py`, whose blocks obey Mosaic's tiling and whose row gathers
          are DMAs (`tpu_row_gather.py`).

`lowering_for(platform)` traces the kernels for another platform than the default backend, so that a CPU
machine can check that they lower: `with lowering_for("gpu"): jax.jit(f).trace(*args).lower(
lowering_platforms=("cuda",))` raises on any operation Pallas cannot lower to Triton; "tpu" with
`lowering_platforms=("tpu",)` applies Mosaic's rules. `interpreting("tpu")` runs the TPU kernels on this CPU
under Pallas' TPU interpreter, which simulates TPU memory spaces, DMAs and semaphores.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

IMPLS = ("auto", "xla", "pallas")
PLATFORMS = ("gpu", "tpu")

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_target", default=None)
_SIMULATED: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_simulated", default=None)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, platform: str):
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    token = var.set(platform)
    try:
        yield
    finally:
        var.reset(token)


def lowering_for(platform: str):
    """Kernels traced in this context are built for `platform` ("gpu" or "tpu"), compiled, not interpreted."""
    return _setting(_TARGET, platform)


def interpreting(platform: str):
    """Kernels traced in this context are `platform`'s ("gpu" or "tpu"), run under its interpreter."""
    return _setting(_SIMULATED, platform)


def platform() -> str:
    """The platform kernels are built for: the `lowering_for` target, the `interpreting` one, else the
    default backend."""
    return _TARGET.get() or _SIMULATED.get() or jax.default_backend()


def backend() -> str:
    """The Pallas kernel family "pallas" runs on this platform: "mosaic" on TPU, "triton" elsewhere."""
    return "mosaic" if platform() == "tpu" else "triton"


def resolve(impl: str, *, mosaic: bool = True, partitions_itself: bool = False) -> str:
    """"xla" or "pallas" for `impl` on the target platform; a clear error for anything else.

    mosaic=False: the entry point has no TPU kernel yet, so on TPU "auto" is "xla" and "pallas" raises
    (its Triton-shaped kernel would not lower there).
    partitions_itself: the entry point runs its kernel inside its own `shard_map` (the N-gram lookup). Any
    other Mosaic kernel under a mesh of several devices would be left to XLA's automatic partitioning, which
    Mosaic refuses ("Mosaic kernels cannot be automatically partitioned"), so there "auto" is "xla".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not mosaic and backend() == "mosaic":
        if impl == "pallas":
            raise NotImplementedError("this kernel has no TPU (Mosaic) version yet: use impl='auto' or 'xla'")
        return "xla"
    if impl == "auto":
        if backend() == "mosaic" and not partitions_itself and jax.sharding.get_abstract_mesh().size > 1:
            return "xla"
        return "pallas" if platform() in PLATFORMS else "xla"
    return impl


def interpret() -> bool:
    """Pallas runs in interpret mode where no Pallas lowering exists (CPU) or under `interpreting`."""
    if _TARGET.get() is not None:
        return False
    return _SIMULATED.get() is not None or jax.default_backend() not in PLATFORMS


def tpu_interpret():
    """The `interpret=` of a Mosaic kernel: False where it compiles, else the TPU interpreter's parameters
    (which raise on an out-of-bounds read or DMA and fill uninitialised memory with NaN)."""
    if not interpret():
        return False
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def mosaic_params(*dimension_semantics: str):
    """Mosaic's compiler parameters: how each grid axis may be split over TensorCores ("parallel") or must
    run in order ("arbitrary")."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Triton's launch parameters on a GPU (which also selects the Triton lowering); None elsewhere."""
    if platform() != "gpu":
        return None
    # Imported here, not at the top: loading Pallas' Triton backend is needed only to build GPU kernels, and
    # `import longcat_jax` on a CPU or TPU machine should not pay for it.
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
