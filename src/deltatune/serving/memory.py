"""Keep the memory a server frees for its next allocations.

A serving loop allocates and frees tensors of a few MiB at every step (the KV cache grows by a
column, rows join and leave). glibc's malloc hands such blocks back to the kernel when the top
of the heap is free past its trim threshold, and blocks above its mmap threshold always, so
the next step's allocation faults every page in again: on a 2-core CPU that was a tenth of a
mixed batch's time (measured with bench/serve.py). Raising both thresholds through ``mallopt``,
glibc's documented tuning call, keeps the memory with the process instead; its resident size
stays at its peak, as a server's does.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems: allocations below it come from the heap
MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory() -> bool:
    """Ask the C library's malloc to keep freed memory for reuse; whether it took the settings
    (False where the C library has no ``mallopt``, as on macOS or musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
