"""Keep freed host memory in the process, so XLA:CPU's per-step buffers stop page-faulting.

XLA:CPU allocates a step's temporaries afresh on every run. glibc's malloc hands blocks above its mmap
threshold straight to the kernel and trims the heap top on free, so each step maps its ~1.6 GB of
temporaries (the `small` training step) anew and takes one minor page fault per 4 KiB page: about 390,000
faults and 0.7 s of system time per step on a 2-core machine. Serving every block from the main heap (no
per-block mmap, one arena: a second arena's heaps are mmapped too) and never trimming it lets the next step
reuse the same pages. The cost is memory: the heap grows to the steps' high-water mark plus fragmentation and
never shrinks. Peak RSS of a process running the `small` benchmark step was 3.46-4.81 GB over five runs with
it, 3.56-3.77 GB without. `bench/train.py --default-malloc` runs the benchmark without it: see README,
"Training throughput".

This is a process-wide setting of the C library, so only entry points (train.py and bench/train.py run as
scripts) call it, before the first JAX computation starts XLA's threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_host_memory() -> bool:
    """Configure glibc malloc to reuse freed memory instead of returning it to the kernel.

    Returns True when every setting took effect, False where the C library is not glibc (macOS, musl), where
    nothing changes.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
