"""Process memory settings for a long-running API process (glibc malloc, Linux).

The shared encoder allocates activation buffers of a different size for every batch (its
length and width vary with the traffic). glibc's default raises its mmap threshold each
time such a buffer is freed, so later buffers come from the heap, whose holes are kept:
resident memory then creeps up with traffic, not with what the process holds. A fixed
threshold keeps large buffers in their own mappings, returned to the system when freed;
two arenas stop every thread from growing its own heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedtext.serving.memory")

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 64 * 1024
ARENA_MAX = 2


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold and arena count; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_ARENA_MAX, ARENA_MAX)
    )
    if not ok:
        log.warning("glibc refused the allocator settings; memory may creep with traffic")
    return ok
