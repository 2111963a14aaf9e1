"""Memory between steps: the metrics carry the resident size, and giving freed memory back to the OS
(``trim_memory``, glibc's malloc_trim) changes nothing in what is trained."""

from __future__ import annotations

import sys

import pytest
import torch
from _train_helpers import tiny_cfg, trainable_tensors

from bunny.train import run
from bunny.train.memory import release_free_memory
from bunny.train.metrics import read_metrics


def test_trim_memory_trains_the_same_tensors_and_rss_is_logged(tmp_path):
    run(tiny_cfg(tmp_path / "trim", max_steps=3, trim_memory=True))
    run(tiny_cfg(tmp_path / "keep", max_steps=3, trim_memory=False))
    a, b = trainable_tensors(tmp_path / "trim"), trainable_tensors(tmp_path / "keep")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [r for r in read_metrics(tmp_path / "trim") if "step" in r]
    assert len(records) == 3 and all(r["rss_mb"] > 10 for r in records)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_returns_freed_pages():
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MB in heap-sized blocks (below mmap threshold)
    for blk in blocks:
        blk[::4096] = b"x" * len(blk[::4096])  # touch every page
    high = rss_mb()
    del blocks[:-1]  # the last block keeps the heap top in use, so only a trim can return the rest
    assert release_free_memory()
    assert rss_mb() < high - 128
