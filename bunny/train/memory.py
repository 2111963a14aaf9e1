"""Giving freed memory back to the operating system between steps (glibc's ``malloc_trim``).

Why: a CPU step frees gigabytes of activations, but glibc keeps freed heap memory mapped (its mmap
threshold rises after the first large frees, so later activations come from the heap and stay
resident): the process's RSS then shows the largest step ever taken, plus fragmentation from
ever-changing sequence lengths, long after it is needed. ``malloc_trim(0)`` after each optimizer step
returns the free pages; it costs milliseconds. It does not lower the peak of a step: that is the
activations (see docs/training.md, "Memory": gradient checkpointing, micro-batches).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has none
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc); False where there is no ``malloc_trim``."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
