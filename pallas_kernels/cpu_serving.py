"""The CPU serving step's own kernels, XLA FFI custom calls over float32 activations: matmuls of few rows
(decode rows), a MoE layer's experts over their few rows each, and dense decode attention over the paged
cache. The matmuls read float32 or bfloat16 weights; a bfloat16 one is widened to float32 in registers as it
is loaded (exactly), so a checkpoint kept in bfloat16 streams half the bytes per decode step and computes
what its float32 copy would.

Reference: `x @ w` (`matmul`, `small_rows_matmul`); `jnp.einsum("...hk,hkn->...hn")` (`heads_matmul`);
`longcat_jax.model.expert_tiles.tiled_expert_ffn` (`grouped_swiglu`); `longcat_jax.model.mla.
attend_paged_decode` (`paged_decode_attention`).

Why: XLA:CPU runs a matmul of 2 to 32 rows through a kernel that streams the weight at about half the memory
bandwidth a one-row matmul gets (on a 2-core Xeon: 8 rows x [512, 1536] 207-257 us, one row 86-95), and a
serving step of a few decode rows is little else: its dense, attention-projection and LM-head matmuls read
every weight once. `cpu_serving.cc` keeps a block of up to 8 rows' outputs in registers while it streams a
panel of the weight once, summing every output in order of k whatever the batch (bench/cpu_serving.py on a
2-core Xeon: 2-8 rows 1.2-2.0x faster than XLA's on the serving benchmark model's weights).
`grouped_swiglu` runs all of a layer's experts in one call, each expert's rows against its own weights, in
place of the expert tiles' loop of switches. `paged_decode_attention` reads each sequence's rows through its
page table where XLA gathers them into a copy first and then reads that twice, for the scores and the values.
All together, against XLA's paths in one process (bench/cpu_serving.py, 2-core Xeon, the serving benchmark's
model): decode steps of 1 / 8 / 16 / 32 rows 1.35x / 1.47x / 1.53x / 1.86x faster, prefill chunks of 64-256
tokens 1.12-1.21x; over the same weights in bfloat16 the decode steps another 1.35-1.46x, prefill 0.99-1.10x.

The C++ source is compiled on first use with the machine's C++ compiler ($CXX, else `c++`) for this CPU, into
~/.cache/longcat-jax/cpu_serving/, and registered with XLA. Where it cannot be built (no compiler), a warning
says so once and the step keeps XLA's paths. The kernels run only inside `small_rows()`, which the CPU
serving step (`longcat.jit_paged_step`) sets while it is traced; training and every other backend keep XLA's.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("longcat_jax.kernels")

MAX_ROWS = 16  # at 32 rows no longer faster on every weight (x [1536, 512]: 374 against XLA's 348 us)
# The grouped experts beat 16-row tiles of XLA's or this matmul up to 32 rows per expert (prefill chunks of
# 160 and 256 tokens on the serving benchmark's model: 3-4%); training batches keep XLA's 64-row tiles.
MAX_GROUPED_ROWS = 32
# A sequence decoding alone splits its heads between the threads, which then both read all its rows: on the
# serving benchmark's attention (8 heads, rows of 160) 1.6-2x faster than XLA's up to 2048 positions, 0.83x
# at 4096; the LSA benchmark's dense decode step at 32K positions took 48 ms against XLA's 34. Several
# sequences split by row.
MAX_ALONE_POSITIONS = 2048
_TARGET = "longcat_small_rows_matmul"
_GROUPED = "longcat_grouped_swiglu"
_HEADS = "longcat_small_rows_heads_matmul"
_ATTENTION = "longcat_paged_decode_attention"
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_serving.cc")
_active = contextvars.ContextVar("longcat_cpu_serving_kernels", default=False)


@contextlib.contextmanager
def small_rows(enabled: bool = True):
    """Within it (while a CPU program is traced), the functions here run their custom calls where they
    apply."""
    token = _active.set(enabled)
    try:
        yield
    finally:
        _active.reset(token)


WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)


def _enabled(x: jax.Array, w: jax.Array) -> bool:
    """Inside `small_rows()`, x float32, w float32 or bfloat16, and the kernels built."""
    return _active.get() and x.dtype == jnp.float32 and w.dtype in WEIGHT_DTYPES and available()


def _kernel_applies(rows: int, x: jax.Array, w: jax.Array) -> bool:
    """Whether a matmul of `rows` rows runs the custom call: inside `small_rows()` with float32 x, at most
    MAX_ROWS rows for a float32 w, any number for a bfloat16 one. XLA:CPU would first convert a bfloat16
    weight to float32, 0.75-1.1 ms for one of [512, 1536] (its float32 matmul of 17 rows over that weight
    takes 0.37 ms, of 256 rows 2.2), while this kernel over the bfloat16 weight runs 32-256 rows at 0.95-1.6x
    the speed of XLA's float32 dot."""
    return 0 < rows and (rows <= MAX_ROWS or w.dtype == jnp.bfloat16) and _enabled(x, w)


def compute_weight(w: jax.Array, dtype) -> jax.Array:
    """w for a matmul computed in `dtype`: cast to it, except while the CPU serving step is traced, where a
    bfloat16 weight stays as it is for a float32 step: the matmuls here widen it as they read it (half the
    bytes), and cast it themselves where they fall back to XLA's."""
    if _active.get() and w.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32:
        return w
    return w.astype(dtype)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] contracted with w [K, ...] in x's dtype (`jnp.tensordot(x, w.astype(x.dtype), 1)`): the
    custom call where `_kernel_applies`, else XLA's dot."""
    rows, k = math.prod(x.shape[:-1]), x.shape[-1]
    if not _kernel_applies(rows, x, w):
        return jnp.tensordot(x, w.astype(x.dtype), 1)
    y = small_rows_matmul(x.reshape(rows, k), w.reshape(k, -1))
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def heads_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """Per head: x [..., H, K] @ w [H, K, N] -> [..., H, N] in x's dtype (`jnp.einsum("...hk,hkn->...hn")`):
    the custom call where `_kernel_applies`, else XLA's."""
    rows, (h, k) = math.prod(x.shape[:-2]), x.shape[-2:]
    if not _kernel_applies(rows, x, w):
        return jnp.einsum("...hk,hkn->...hn", x, w.astype(x.dtype))
    out = jax.ShapeDtypeStruct((rows, h, w.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call(_HEADS, out)(x.reshape(rows, h, k), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def small_rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """The custom call itself: x [M, K] f32 @ w [K, N] f32 or bf16 -> [M, N] f32 (CPU only; `available()`
    first)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"small_rows_matmul takes [M, K] @ [K, N]; got {x.shape} @ {w.shape}")
    if x.dtype != jnp.float32 or w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"small_rows_matmul takes float32 x and a float32 or bfloat16 w; got {x.dtype} @ "
                         f"{w.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(x, w)


def grouped_applies(rows_per_expert: int, xs: jax.Array, w_down: jax.Array) -> bool:
    """Whether a MoE layer's experts run `grouped_swiglu` here: inside `small_rows()`, float32 rows, at most
    MAX_GROUPED_ROWS rows per expert on average, and D and F multiples of 64 (the widest panel: bfloat16
    weights with AVX-512)."""
    _, f, d = w_down.shape
    return rows_per_expert <= MAX_GROUPED_ROWS and d % 64 == 0 and f % 64 == 0 and _enabled(xs, w_down)


def grouped_swiglu(xs: jax.Array, starts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
    """Each expert's SwiGLU over its rows, as one custom call (CPU only; `grouped_applies` first).

    Reference: `longcat_jax.model.expert_tiles.tiled_expert_ffn`.

    xs [M, D] f32 rows sorted by expert; starts [E+1] int32: expert e's rows are starts[e] .. starts[e+1],
    rows past starts[E] come out 0; w_gate, w_up [E, D, F], w_down [E, F, D] f32 or bf16 (one dtype). Each
    expert's weights go in as operands of their own, so that where the stack is one of separate per-expert
    parameters (the serving step's), XLA folds each slice back to its parameter instead of copying it.
    """
    n_experts = w_gate.shape[0]
    weights = [w[e] for w in (w_gate, w_up, w_down) for e in range(n_experts)]
    out = jax.ShapeDtypeStruct(xs.shape, jnp.float32)
    return jax.ffi.ffi_call(_GROUPED, out)(xs, starts.astype(jnp.int32), *weights)


def paged_attention_applies(q: jax.Array, pages: jax.Array, page_table: jax.Array) -> bool:
    """Whether `paged_decode_attention` runs here: inside `small_rows()`, float32, rows a multiple of 16, and
    not one sequence over more than MAX_ALONE_POSITIONS positions."""
    alone_and_long = q.shape[0] == 1 and page_table.shape[1] * pages.shape[1] > MAX_ALONE_POSITIONS
    return q.shape[-1] % 16 == 0 and not alone_and_long and pages.dtype == jnp.float32 and _enabled(q, pages)


def paged_decode_attention(q: jax.Array, pages: jax.Array, page_table: jax.Array, positions: jax.Array,
                           new_rows: jax.Array, scale: float) -> jax.Array:
    """Dense decode attention of one new token per sequence over its paged rows, as one custom call (CPU only;
    `paged_attention_applies` first). Reference: `longcat_jax.model.mla.attend_paged_decode`.

    q [B, N, X] (latent query | rope query), pages [P, page, X], page_table [B, W] int32, positions [B] int32
    (the new token's, whose own row is new_rows [B, X]); all float32. Returns [B, N, X]: softmax over
    positions 0 .. positions[b] of q . row * scale, times the rows.
    """
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call(_ATTENTION, out)
    return call(q, pages, positions.astype(jnp.int32), page_table.astype(jnp.int32), new_rows,
                scale=np.float32(scale))


_lock = threading.Lock()  # step programs are traced from several threads (`StepPrograms.compile_all`)


def available() -> bool:
    """Whether the custom calls are built and registered (built now if they were not); warns once if not."""
    with _lock:
        return _load()


@functools.cache
def _load() -> bool:
    try:
        lib = ctypes.cdll.LoadLibrary(_build())
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the CPU serving kernels could not be built (%s); serving steps use XLA's matmuls and "
                    "attention, slower for decode steps", e)
        return False
    for target, symbol in ((_TARGET, lib.LongcatSmallRowsMatmul), (_HEADS, lib.LongcatSmallRowsHeadsMatmul),
                           (_GROUPED, lib.LongcatGroupedSwiglu),
                           (_ATTENTION, lib.LongcatPagedDecodeAttention)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return True


def _build() -> str:
    """The path of the compiled library, compiling it if this source, jaxlib, compiler and CPU have none."""
    cxx = os.environ.get("CXX", "c++")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256("\0".join([source.decode(), importlib.metadata.version("jaxlib"), cxx, *flags,
                                     _cpu_description()]).encode()).hexdigest()[:16]
    folder = os.path.expanduser("~/.cache/longcat-jax/cpu_serving")
    path = os.path.join(folder, f"cpu_serving-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([cxx, *flags, _SOURCE, "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, path)  # whole or not at all: a half-written library is never found under `path`
    except subprocess.CalledProcessError as e:
        errors = [line for line in e.stderr.splitlines() if "error" in line] or e.stderr.splitlines()[-1:]
        raise subprocess.SubprocessError(f"{cxx} failed: {errors[0].strip() if errors else e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _cpu_description() -> str:
    """This CPU's model and flags (`-march=native` builds for them)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines()
        return "\n".join(line for line in first if line.startswith(("vendor_id", "model name", "flags")))
    except OSError:
        return platform.processor() + platform.machine()
