"""Steps 4-6: rank bands and the final random draw.

A band ``[lo, hi]`` ranks the n survivors by score, highest first (rank 0 = most similar; ties by
gidx), and keeps ranks ``floor(lo*n) .. floor(hi*n)-1``. ``[0, 1]`` keeps everything. The paper
does not say which end rank 0 is; we read "rank" as most-similar-first (docs/curation.md), so the
centroid band 15%-35% drops the 15% most typical images and everything past 35%.
"""

from __future__ import annotations

import math

import numpy as np


def band_bounds(n: int, band: tuple[float, float]) -> tuple[int, int]:
    lo, hi = band
    return math.floor(lo * n + 1e-9), math.floor(hi * n + 1e-9)


def rank_band(scores: np.ndarray, gidx: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Boolean mask over the rows: inside the band of the descending ranking."""
    n = len(scores)
    start, stop = band_bounds(n, band)
    order = np.lexsort((gidx, -scores))
    keep = np.zeros(n, dtype=bool)
    keep[order[start:stop]] = True
    return keep


def random_sample(n: int, size: int | None, seed: int) -> np.ndarray:
    """Mask keeping ``size`` of ``n`` rows (in gidx order) at random; all when size is None or >= n."""
    keep = np.zeros(n, dtype=bool)
    if size is None or size >= n:
        keep[:] = True
    else:
        keep[np.random.default_rng(seed).choice(n, size=size, replace=False)] = True
    return keep


def basic_filter(captions, widths, heights, cfg) -> np.ndarray:
    """DataComp-style basic filter: caption length, shorter image side, aspect ratio (off when 0/None).

    ``captions`` is a pyarrow string array (nulls fail a caption filter); ``widths``/``heights``
    are arrays or None when the sizes are unknown (then an image filter is an error upstream).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(captions)
    keep = np.ones(n, dtype=bool)
    if cfg.min_caption_words or cfg.min_caption_chars:
        captions = pc.fill_null(pc.cast(captions, pa.string()), "")
        if cfg.min_caption_chars:
            keep &= pc.utf8_length(pc.utf8_trim_whitespace(captions)).to_numpy(zero_copy_only=False) >= cfg.min_caption_chars
        if cfg.min_caption_words:
            words = pc.count_substring_regex(captions, r"\S+").to_numpy(zero_copy_only=False)
            keep &= words >= cfg.min_caption_words
    if cfg.min_image_side or cfg.max_aspect_ratio:
        w = np.asarray(widths, dtype=np.float64)
        h = np.asarray(heights, dtype=np.float64)
        short, long = np.minimum(w, h), np.maximum(w, h)
        if cfg.min_image_side:
            keep &= short >= cfg.min_image_side
        if cfg.max_aspect_ratio:
            keep &= long <= cfg.max_aspect_ratio * np.maximum(short, 1e-9)
    return keep
