"""Worker threads for independent pieces of work (k-means cells, clusters), each single-threaded.

Why threads of one thread each instead of multi-threaded libraries: the pieces are small (a
cluster is ~1,000 x 768), and the OpenMP teams of faiss and torch spin while they wait between
such small products, costing several times the work, and far more when other processes share the
CPU. Independent pieces on one thread each keep every core busy with useful work instead. NumPy,
faiss and torch release the GIL inside their kernels, so the threads do run in parallel.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor


def worker_count(threads: int | None) -> int:
    """``threads``, or one per CPU this process may use."""
    if threads:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _single_threaded() -> None:
    """Thread initializer: this thread's faiss and torch kernels use one thread (OpenMP settings
    are per thread)."""
    import faiss

    faiss.omp_set_num_threads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextlib.contextmanager
def worker_pool(threads: int | None) -> Iterator[ThreadPoolExecutor]:
    """A pool of single-threaded workers; torch's thread setting is restored afterwards."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        with ThreadPoolExecutor(worker_count(threads), initializer=_single_threaded) as pool:
            yield pool
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(before or worker_count(None))
