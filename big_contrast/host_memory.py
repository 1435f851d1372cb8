"""Host memory that XLA:CPU can reuse from one step to the next.

XLA:CPU allocates each execution's scratch buffer (385 MiB for the train step of
benchmarks/compare_open_clip.py) from whichever pool thread runs it. glibc serves an
allocation that large from a fresh ``mmap`` when the thread has an arena of its own, whatever
the mmap threshold, and unmaps it when the step frees it; so every step page-faults its whole
scratch buffer in again (measured there: 99,000 minor faults and about 0.2 s of kernel time
per step, a fifth of the step's CPU time). With one arena, no mmap and no trimming, freed
memory goes back to the heap and the next step reuses it. The cost: the process keeps its
peak heap size until it exits, which a training process reaches in its first steps anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse (see the module docstring).

    Call it before jax creates its CPU client (its pool threads take an arena on their first
    allocation). A no-op that returns False off Linux or without glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
