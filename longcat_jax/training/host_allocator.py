"""Keep freed host memory in the process, so XLA:CPU's per-step buffers stop page-faulting.

XLA:CPU allocates a step's temporaries afresh on every run. glibc's malloc hands blocks above its mmap
threshold straight to the kernel and trims the heap top on free, so each step maps its temporaries anew and
takes one minor page fault per 4 KiB page: about 340,000 faults and 0.6 s of system time per step of the
`small` training benchmark on a 2-core machine (bench/train.py --default-malloc), next to none with this.
Serving every block from the main heap (no per-block mmap; one arena, since a second arena's heaps are
mmapped too) and trimming it only when more than 2 GiB lie free at its top (mallopt's int limit) lets the next
step reuse the same pages. The cost is memory the process keeps: the benchmark process (three training sides)
peaked about 10% higher (8.3 GB against 7.5 GB); see README, "Training benchmark".

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
