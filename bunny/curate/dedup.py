"""Step 3: near-duplicate removal inside one cluster, in bounded memory.

Pairs whose cosine similarity exceeds the threshold are edges of a graph; each connected
component keeps one member. The similarity matrix is never built whole: blocks of
``block_size x block_size`` are computed, thresholded and folded into a union-find at once, so
memory is O(block_size^2 + m) for a cluster of m rows, however large the cluster.

The union-find is vectorised (hook roots onto the smaller root, compress the paths that were
followed): every component's root is its smallest row, so the result does not depend on the order
edges arrive in.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            break
        r = rr
    parent[x] = r  # path compression for the nodes asked about
    return r


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    while a.size:
        ra, rb = _find(parent, a), _find(parent, b)
        differ = ra != rb
        if not differ.any():
            return
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        # parent[hi] = min over the edges of lo; roots only, so every hook shrinks a root's id
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def components(emb: np.ndarray, threshold: float, block_size: int) -> np.ndarray:
    """Component label (= smallest member row) of each row of the normalised ``emb``."""
    m = len(emb)
    parent = np.arange(m, dtype=np.int64)
    for i0 in range(0, m, block_size):
        a = emb[i0 : i0 + block_size]
        for j0 in range(i0, m, block_size):
            ii, jj = np.nonzero(a @ emb[j0 : j0 + block_size].T > threshold)
            if j0 == i0:
                upper = jj > ii
                ii, jj = ii[upper], jj[upper]
            if ii.size:
                _union(parent, ii + i0, jj + j0)
    return _find(parent, np.arange(m))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a seeded, order-free pseudo-random number per component."""
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def dedup_cluster(
    emb: np.ndarray,
    gidx: np.ndarray,
    cent_sim: np.ndarray,
    threshold: float,
    keep: str = "median",
    seed: int = 0,
    block_size: int = 2048,
) -> np.ndarray:
    """The gidx of the member kept for each row's component (a row is kept when it equals its own gidx).

    ``keep`` picks per component, with members ordered by distance to the centroid (nearest
    first, ties by gidx): ``median`` the member at position (size-1)//2, ``nearest`` the first,
    ``farthest`` the last, ``random`` a seeded draw that depends only on the component.
    Rows must be in ascending gidx order (both engines pass them so).
    """
    m = len(gidx)
    if m == 0:
        return gidx.copy()
    label = components(emb, threshold, block_size)
    order = np.lexsort((gidx, -cent_sim, label))  # by component, then nearest first, then gidx
    lab = label[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sizes = np.diff(np.r_[starts, m])
    if keep == "median":
        pick = starts + (sizes - 1) // 2
    elif keep == "nearest":
        pick = starts
    elif keep == "farthest":
        pick = starts + sizes - 1
    elif keep == "random":
        first = gidx[lab[starts]]  # the component's smallest gidx (labels are smallest rows)
        draw = _mix(first.astype(np.uint64) ^ _mix(np.full(len(first), seed, dtype=np.uint64)))
        pick = starts + (draw % sizes.astype(np.uint64)).astype(np.int64)
    else:
        raise ValueError(f"keep must be one of median, nearest, farthest, random; got {keep!r}")
    rep = np.empty(m, dtype=np.int64)
    rep[order] = np.repeat(gidx[order[pick]], sizes)
    return rep
