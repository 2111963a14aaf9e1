"""Step 2: spherical k-means on L2-normalised image embeddings (faiss), trained on a sample, then
every vector assigned to its nearest centroid.

Training follows what is done for billions of vectors: draw a seeded sample (``kmeans_train_size``),
train; with ``kmeans_rounds > 1`` draw a fresh sample per round and warm-start from the previous
centroids, so the centroids see far more data than one sample holds.

``coarse_clusters > 0`` makes it two-level: ``coarse_clusters`` centroids first, then each coarse
cell gets its share of the ``clusters`` fine centroids (by its share of the sample), trained on the
sample vectors in that cell. A vector's cluster is its nearest fine centroid *inside its nearest
coarse cell*. Assignment then costs O(coarse + clusters/coarse) dot products per vector instead of
O(clusters), which keeps the whole pipeline linear in N when the number of clusters grows with N.
``0`` is the paper's single flat level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from .config import CurateConfig
from .parallel import worker_pool

ASSIGN_BLOCK_FLOATS = 1 << 24  # similarity entries per assignment block (64 MB)
SINGLE_THREAD_K = 64
COARSE_POINTS_PER_CENTROID = 256


def _normalize(c: np.ndarray) -> np.ndarray:
    c = c.astype(np.float64)
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int, init: np.ndarray | None = None,
            threads: int | None = None, max_points_per_centroid: int = 1 << 30) -> np.ndarray:
    """Spherical k-means of the rows of ``x`` (normalised) -> k normalised centroids.

    Small problems (k <= ``SINGLE_THREAD_K``, e.g. the coarse level and every second-level cell)
    run on one thread: faiss's OpenMP threads spin while they wait, which costs several times the
    work of a skinny product (and far more on a shared CPU).
    """
    k = min(k, len(x))
    if threads is None and k <= SINGLE_THREAD_K:
        threads = 1
    if k == 1:
        return _normalize(x.mean(axis=0, keepdims=True, dtype=np.float64))
    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
        max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
    )
    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=init)
    finally:
        faiss.omp_set_num_threads(before)
    return _normalize(km.centroids)


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the most similar row of ``c`` for each row of ``x`` (BLAS in bounded blocks)."""
    out = np.empty(len(x), dtype=np.int64)
    step = max(1, ASSIGN_BLOCK_FLOATS // max(1, len(c)))
    for i in range(0, len(x), step):
        out[i : i + step] = np.argmax(x[i : i + step] @ c.T, axis=1)
    return out


def _split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder), each >= 1."""
    w = weights / weights.sum()
    base = np.maximum(1, np.floor(w * total).astype(np.int64))
    while base.sum() > total:  # the ">= 1" floor overshot: take from the largest
        base[np.argmax(base)] -= 1
    rest = total - base.sum()
    if rest > 0:
        order = np.lexsort((np.arange(len(w)), -(w * total - np.floor(w * total))))
        base[order[:rest]] += 1
    return base


@dataclass
class Clustering:
    """Centroids (``[k, dim]``, normalised) and, when two-level, the coarse cells that own them."""

    centroids: np.ndarray
    coarse: np.ndarray | None = None  # [k1, dim]
    offsets: np.ndarray | None = None  # cell c owns centroids[offsets[c]:offsets[c+1]]

    @property
    def k(self) -> int:
        return len(self.centroids)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster id, cosine similarity to that centroid) for normalised rows ``x``."""
        if self.coarse is None:
            cluster = _nearest(x, self.centroids)
        else:
            assert self.offsets is not None
            cell = _nearest(x, self.coarse)
            cluster = np.empty(len(x), dtype=np.int64)
            for c in np.unique(cell):
                rows = np.flatnonzero(cell == c)
                lo, hi = self.offsets[c], self.offsets[c + 1]
                cluster[rows] = lo + _nearest(x[rows], self.centroids[lo:hi])
        # row by row (not from the BLAS block): the value a row gets does not depend on its batch
        sim = np.einsum("ij,ij->i", x, self.centroids[cluster])
        return cluster, sim

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"centroids": self.centroids}
        if self.coarse is not None:
            out |= {"coarse": self.coarse, "offsets": self.offsets}
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Clustering:
        return cls(arrays["centroids"], arrays.get("coarse"), arrays.get("offsets"))


def train(draw: Callable[[int], np.ndarray], cfg: CurateConfig) -> Clustering:
    """Train on ``draw(round)`` (a normalised sample per round), warm-starting across rounds."""
    centroids = coarse = None
    sample = None
    top_k = cfg.coarse_clusters or cfg.clusters
    for r in range(cfg.kmeans_rounds):
        sample = draw(r)
        init = coarse if cfg.coarse_clusters else centroids
        if init is not None and len(init) != min(top_k, len(sample)):
            init = None  # a smaller sample this round than the last: start afresh
        # flat: the whole sample (the caller's choice); the coarse level of two: faiss's usual
        # 256 points per centroid are plenty for a few dozen cells
        trained = _kmeans(sample, top_k, cfg.kmeans_iters, cfg.seed + r, init,
                          max_points_per_centroid=COARSE_POINTS_PER_CENTROID if cfg.coarse_clusters else 1 << 30)
        if cfg.coarse_clusters:
            coarse = trained
        else:
            centroids = trained
    assert sample is not None
    if not cfg.coarse_clusters:
        return Clustering(centroids)
    assert coarse is not None
    cell = _nearest(sample, coarse)
    counts = np.bincount(cell, minlength=len(coarse))
    fine_k = np.zeros(len(coarse), dtype=np.int64)
    present = counts > 0
    fine_k[present] = np.minimum(counts[present], _split_counts(min(cfg.clusters, len(sample)), counts[present]))

    def fine(c: int) -> np.ndarray:
        if not fine_k[c]:  # a coarse cell no sample vector fell into keeps one centroid: itself
            return coarse[c : c + 1]
        return _kmeans(sample[cell == c], int(fine_k[c]), cfg.kmeans_iters, cfg.seed + 7919 * (c + 1), threads=1)

    with worker_pool(cfg.threads) as pool:  # cells are independent: one per worker thread
        parts = list(pool.map(fine, range(len(coarse))))
    offsets = np.cumsum([0] + [len(p) for p in parts])
    return Clustering(np.concatenate(parts), coarse, offsets.astype(np.int64))
