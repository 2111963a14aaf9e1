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
    image_paths: bool = False,
) -> np.ndarray:
    """Write an ``n``-row pool under ``root``; return each row's planted group id (-1: not planted).

    About ``dup_fraction`` of the rows belong to planted groups of 2..``max_group`` members,
    scattered over the pool. Keys are the row numbers, zero-padded (``000000042``);
    ``image_paths`` adds an ``image`` column (``images/000000042.jpg``; no files) so that the
    coreset JSON is written too.
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
        meta = {"key": keys, "caption": [f"caption of sample {i}" for i in range(start, stop)]}
        if image_paths:
            meta["image"] = [f"images/{k}.jpg" for k in keys]
        write_shard(root, index, img.astype(dtype), txt.astype(dtype), meta)
    np.save(root / "planted_groups.npy", group)
    return group


def dedup_quality(group: np.ndarray, dropped_rows: np.ndarray, duplicate_of: np.ndarray) -> dict[str, float]:
    """Recall and precision of a dedup against the planted groups.

    A planted group of s members should lose s - 1 of them. A drop is correct when the row and the
    member it was folded into (``duplicate_of``, row numbers) are in the same planted group.
    """
    expected = int(np.sum(np.maximum(np.bincount(group[group >= 0]) - 1, 0)))
    correct = int(np.sum((group[dropped_rows] >= 0) & (group[dropped_rows] == group[duplicate_of])))
    return {"planted_duplicates": expected, "dropped": int(len(dropped_rows)), "correct": correct,
            "recall": correct / max(expected, 1), "precision": correct / max(len(dropped_rows), 1)}


def main(argv: list[str] | None = None) -> int:
    """``python -m bunny.curate.synthetic --out DIR --n 200000``: a pool to try ``bunny curate`` on."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bunny.curate.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the clip-retrieval layout")
    p.add_argument("--n", type=int, default=200_000, help="samples (default 200000)")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension (default 768)")
    p.add_argument("--shard-rows", type=int, default=100_000, help="rows per shard (default 100000)")
    p.add_argument("--dup-fraction", type=float, default=0.2, help="share of rows in planted groups (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    group = planted_pool(args.out, args.n, args.dim, args.shard_rows, args.dup_fraction, seed=args.seed)
    print(f"{args.n} samples in {args.out}; {int((group >= 0).sum())} in {len(np.unique(group[group >= 0]))} "
          "planted near-duplicate groups (planted_groups.npy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
