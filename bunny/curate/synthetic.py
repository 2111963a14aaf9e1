"""Synthetic embedding pools in the clip-retrieval layout, with planted near-duplicate groups.

Used by the tests and ``benchmarks/bench_curate.py``. Vectors live around ``topics`` random
directions (same-topic cosine about 0.4, far below a dedup threshold); a planted group is one base
vector plus small noise per member (member-member cosine about 0.95). Text vectors are the image
vector plus noise of a per-row strength, so image-text similarity spreads over a range. Rows are
generated shard by shard, so a pool larger than memory can be written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import write_shard


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_pool(
    root: str | Path,
    n: int,
    dim: int = 768,
    shard_rows: int = 100_000,
    dup_fraction: float = 0.2,
    max_group: int = 5,
    points_per_topic: int = 2000,
    dtype: str = "float16",
    seed: int = 0,
) -> np.ndarray:
    """Write an ``n``-row pool under ``root``; return each row's planted group id (-1: not planted).

    About ``dup_fraction`` of the rows belong to planted groups of 2..``max_group`` members,
    scattered over the pool.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((max(1, n // points_per_topic), dim), dtype=np.float32))
    # planted groups: consecutive ids, then the rows shuffled so members land anywhere
    sizes = []
    planted = 0
    while planted < dup_fraction * n:
        sizes.append(int(rng.integers(2, max_group + 1)))
        planted += sizes[-1]
    sizes = np.array(sizes[:-1] if planted > n else sizes, dtype=np.int64)
    group = np.full(n, -1, dtype=np.int64)
    group[: sizes.sum()] = np.repeat(np.arange(len(sizes)), sizes)
    group = group[rng.permutation(n)]
    group_topic = rng.integers(0, len(topics), len(sizes))
    row_topic = np.where(group >= 0, group_topic[np.maximum(group, 0)], rng.integers(0, len(topics), n))
    spread = np.sqrt(1.5 / dim)  # ||noise||^2 ~ 1.5: same-topic cosine ~ 0.4
    bases = _unit(topics[group_topic] + spread * rng.standard_normal((len(sizes), dim), dtype=np.float32))
    jitter = np.sqrt(0.05 / dim)  # members of a group: cosine ~ 0.95
    text_noise = rng.uniform(1.0, 4.0, n).astype(np.float32)  # image-text cosine ~ 0.45 .. 0.9
    for index, start in enumerate(range(0, n, shard_rows)):
        stop = min(n, start + shard_rows)
        g = group[start:stop]
        srng = np.random.default_rng([seed, index])
        noise = srng.standard_normal((stop - start, dim), dtype=np.float32)
        planted_rows = g >= 0
        img = topics[row_topic[start:stop]] + spread * noise
        img[planted_rows] = bases[g[planted_rows]] + jitter * noise[planted_rows]
        img = _unit(img)
        tn = srng.standard_normal((stop - start, dim), dtype=np.float32)
        txt = _unit(img + (text_noise[start:stop, None] * np.sqrt(0.25 / dim)) * tn)
        keys = [f"{i:09d}" for i in range(start, stop)]
        write_shard(root, index, img.astype(dtype), txt.astype(dtype),
                    {"key": keys, "caption": [f"caption of sample {i}" for i in range(start, stop)]})
    return group
