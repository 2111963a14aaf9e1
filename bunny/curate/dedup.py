"""Step 3: near-duplicate removal inside one cluster, in bounded memory.

Pairs whose cosine similarity exceeds the threshold are edges of a graph; each connected
component keeps one member. The similarity matrix is never built whole: blocks of
``block_size x block_size`` are computed, thresholded and folded into a union-find at once, so
memory is O(block_size^2 + m) for a cluster of m rows, however large the cluster.

Exactness: a block's matrix product only *proposes* candidate pairs, those above
``threshold - margin``, where the margin is a proven bound on that product's rounding error
(``float32_margin``, ``bf16_margin``). Each candidate is then decided by its float64 dot product,
row by row. So the edges, and the coreset,
are the same whichever product proposed them (``dedup_matmul``), whatever the block size, and on
either engine. bfloat16 is about six times faster on CPUs with AMX / AVX512-BF16, which is where
the time of this step goes.

The union-find is vectorised (hook roots onto the smaller root, compress the paths that were
followed): every component's root is its smallest row, so the result does not depend on the order
edges arrive in.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def bf16_margin(dim: int) -> float:
    """A bound on |bf16(x).bf16(y) - x.y| for unit x, y, with 25% to spare.

    Inputs rounded to 8 significant bits (u = 2^-8: at most (2u + u^2)|x||y| = 0.0079), float32
    accumulation (at most dim * 2^-24), the bf16 result rounded (at most 2^-9 for |s| <= 1).
    ``_bf16_ok`` checks it against float64 on this machine before bf16 is used.
    """
    u = 2.0**-8
    return 1.25 * (2 * u + u * u + dim * 2.0**-24 + 2.0**-9)


def float32_margin(dim: int) -> float:
    """A bound on the rounding error of a float32 dot product of unit vectors (dim * 2^-24), doubled."""
    return 2.0 * dim * 2.0**-24 + 1e-7


VERIFY_PAIRS = 4096  # candidate pairs decided in float64 at once (memory: 2 x 4096 x dim x 8 bytes)
AUTO_BF16_MIN_ROWS = 100_000  # below this, `auto` stays with float32
DENSE_FRACTION = 0.125  # a block with more candidates than this is decided with one float64 product
SHAPE_STEP = 128  # bf16 blocks are padded to a multiple of this many rows


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


@functools.lru_cache(maxsize=1)
def _bf16_ok() -> bool:
    """Whether torch's bfloat16 product is fast here and inside ``bf16_margin`` (checked once)."""
    try:
        import torch
    except ImportError:
        return False
    if not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return False
    x = np.random.default_rng(0).standard_normal((256, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1] = x[0]  # a pair at similarity 1
    t = torch.from_numpy(x).to(torch.bfloat16)
    err = np.abs((t @ t.T).float().numpy() - x.astype(np.float64) @ x.astype(np.float64).T).max()
    if err > bf16_margin(768) / 2:
        log.warning("bfloat16 products err by %.4f here (over %.4f): dedup uses float32", err, bf16_margin(768) / 2)
        return False
    return True


def resolve_matmul(name: str, rows: int | None = None) -> str:
    """``auto`` -> ``bf16`` for pools of ``AUTO_BF16_MIN_ROWS`` rows or more where the CPU multiplies
    bfloat16 natively (and within the margin), else ``float32`` (importing torch costs seconds)."""
    if name == "auto":
        return "bf16" if (rows is None or rows >= AUTO_BF16_MIN_ROWS) and _bf16_ok() else "float32"
    if name not in ("float32", "bf16"):
        raise ValueError(f"dedup_matmul must be auto, float32 or bf16; got {name!r}")
    return name


def _exact_edges(a: np.ndarray, b: np.ndarray, ii: np.ndarray, jj: np.ndarray, threshold: float) -> np.ndarray:
    """Mask over the candidate pairs (ii, jj) whose float64 cosine exceeds ``threshold``."""
    if ii.size > DENSE_FRACTION * len(a) * len(b):
        exact = a.astype(np.float64) @ b.astype(np.float64).T
        return exact[ii, jj] > threshold
    keep = np.empty(ii.size, dtype=bool)
    for p in range(0, ii.size, VERIFY_PAIRS):
        x = a[ii[p : p + VERIFY_PAIRS]].astype(np.float64)
        y = b[jj[p : p + VERIFY_PAIRS]].astype(np.float64)
        keep[p : p + VERIFY_PAIRS] = np.einsum("ij,ij->i", x, y) > threshold
    return keep


def components(emb: np.ndarray, threshold: float, block_size: int, matmul: str = "float32") -> np.ndarray:
    """Component label (= smallest member row) of each row of the normalised float32 ``emb``."""
    m, dim = emb.shape
    parent = np.arange(m, dtype=np.int64)
    if matmul == "bf16":
        import torch

        # rows padded with zeros to a multiple of SHAPE_STEP: oneDNN compiles a kernel per new shape
        # (~10 ms each), and clusters come in every size
        padded = (-(-m // SHAPE_STEP) + 1) * SHAPE_STEP  # every block below slices a full padded shape
        low = torch.empty((padded, dim), dtype=torch.bfloat16)
        low[:m] = torch.from_numpy(np.ascontiguousarray(emb))
        low[m:] = 0
        cut = threshold - bf16_margin(dim)

        def propose(i0: int, j0: int) -> tuple[np.ndarray, np.ndarray]:
            a, b = min(block_size, m - i0), min(block_size, m - j0)
            pa, pb = -(-a // SHAPE_STEP) * SHAPE_STEP, -(-b // SHAPE_STEP) * SHAPE_STEP
            s = (low[i0 : i0 + pa] @ low[j0 : j0 + pb].T)[:a, :b]
            return np.nonzero((s > cut).numpy())
    else:
        cut32 = threshold - float32_margin(dim)

        def propose(i0: int, j0: int) -> tuple[np.ndarray, np.ndarray]:
            return np.nonzero(emb[i0 : i0 + block_size] @ emb[j0 : j0 + block_size].T > cut32)

    for i0 in range(0, m, block_size):
        for j0 in range(i0, m, block_size):
            ii, jj = propose(i0, j0)
            if j0 == i0:
                upper = jj > ii
                ii, jj = ii[upper], jj[upper]
            if not ii.size:
                continue
            real = _exact_edges(emb[i0 : i0 + block_size], emb[j0 : j0 + block_size], ii, jj, threshold)
            if real.any():
                _union(parent, ii[real] + i0, jj[real] + j0)
    return _find(parent, np.arange(m))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a seeded, order-free pseudo-random number per component."""
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def pick_members(label: np.ndarray, gidx: np.ndarray, cent_sim: np.ndarray, keep: str, seed: int) -> np.ndarray:
    """The gidx of the member kept for each row's component, given component labels (smallest row)."""
    m = len(gidx)
    order = np.lexsort((gidx, -cent_sim, label))  # by component, then nearest first, then gidx
    lab = label[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sizes = np.diff(np.r_[starts, m])
    if keep == "median":
        pick = starts + (sizes - 1) // 2
    elif keep in ("nearest", "largest"):  # largest: the caller passes file sizes as the score
        pick = starts
    elif keep == "farthest":
        pick = starts + sizes - 1
    elif keep == "random":
        first = gidx[lab[starts]]  # the component's smallest gidx (labels are smallest rows)
        draw = _mix(first.astype(np.uint64) ^ _mix(np.full(len(first), seed, dtype=np.uint64)))
        pick = starts + (draw % sizes.astype(np.uint64)).astype(np.int64)
    else:
        raise ValueError(f"keep must be one of median, nearest, farthest, random, largest; got {keep!r}")
    rep = np.empty(m, dtype=np.int64)
    rep[order] = np.repeat(gidx[order[pick]], sizes)
    return rep


def dedup_cluster(
    emb: np.ndarray,
    gidx: np.ndarray,
    cent_sim: np.ndarray,
    threshold: float,
    keep: str = "median",
    seed: int = 0,
    block_size: int = 2048,
    matmul: str = "float32",
) -> np.ndarray:
    """The gidx of the member kept for each row's component (a row is kept when it equals its own gidx).

    ``keep`` picks per component, with members ordered by similarity to the centroid (nearest
    first, ties by gidx): ``median`` the member at position (size-1)//2, ``nearest`` the first,
    ``farthest`` the last, ``random`` a seeded draw that depends only on the component;
    ``largest`` the member with the highest ``cent_sim``, which the caller then fills with each
    member's file size (``pipeline.keep_scores``) instead of its similarity.
    Rows must be in ascending gidx order (both engines pass them so).
    """
    if len(gidx) == 0:
        return gidx.copy()
    label = components(emb, threshold, block_size, matmul)
    return pick_members(label, gidx, cent_sim, keep, seed)
