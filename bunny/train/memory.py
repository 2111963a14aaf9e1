"""Giving freed memory back to the operating system between steps (glibc's ``malloc_trim``).

Why: a CPU step frees gigabytes of activations, but glibc keeps freed heap memory mapped (its mmap
threshold rises after the first large frees, so later activations come from the heap and stay
resident): the process's RSS then shows the largest step ever taken, plus fragmentation from
ever-changing sequence lengths, long after it is needed. ``malloc_trim(0)`` after each optimizer step
returns the free pages; it costs ~0.1 s when GBs were freed, plus the page faults of taking them back
in the next step (so ``trim_memory`` is off by default). It does not lower the peak of a step: that is the
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(mb: int) -> bool:
    """Serve every allocation of at least ``mb`` MB with its own mmap, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MB) after the first large frees, so a step's activations
    then come from the heap, where freed blocks of one size rarely fit the next step's sizes: measured
    on SmolLM2 (16 x 259 tokens, gradient checkpointing) the heap grew to 4.5 GB during a forward whose
    live tensors took 1.4 GB. Fixing the threshold keeps RSS at the live set; the price is fresh pages
    (page faults, zeroing) for every large tensor. False where there is no glibc ``mallopt``."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mb * 2**20)))

