"""The raw image-text pool, like a web crawl: true captions plus injected defects in known proportions.

Defects (the column ``defect`` of defects.parquet; ``none`` for a clean sample):
- ``near_duplicate``: a clean sample's image shifted by a pixel, slightly brightened or darkened and
  re-encoded at another JPEG quality, with a new true caption. ``source`` is the original's id.
- ``mismatched_caption``: a real scene with the true caption of another scene. ``source`` is the id
  of the sample whose scene the caption describes.
- ``blank_image``: a flat, nearly uniform image carrying some other scene's caption.
- ``low_info_caption``: a real scene captioned "image", "IMG_4821.jpg", "click to enlarge", ...
The counts are ``round(n * proportion)`` for each defect, exactly.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bunny.data.synthetic.scenes import caption, encode, render, sample_scene

DEFAULT_DEFECTS = {
    "near_duplicate": 0.15,
    "mismatched_caption": 0.10,
    "blank_image": 0.05,
    "low_info_caption": 0.10,
}
DEFECT_NAMES = ("none", *DEFAULT_DEFECTS)
LOW_INFO = (
    "image", "photo", "untitled", "click to enlarge", "stock picture", "no description available",
    "shapes", "download", "picture", "thumbnail", "see more", "free image",
)


def low_info_caption(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.25:
        return f"IMG_{int(rng.integers(1000, 10000))}.jpg"
    if r < 0.35:
        return f"picture {int(rng.integers(1, 100))}"
    return LOW_INFO[int(rng.integers(len(LOW_INFO)))]


def near_duplicate(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """A copy a crawler would find on another site: 1 px shift, +-4% brightness, other JPEG quality."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    arr = np.asarray(img).astype(np.float32)
    dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
    arr = np.roll(arr, (dy, dx), axis=(0, 1))
    arr = np.clip(arr * rng.uniform(0.96, 1.04), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=int(rng.integers(70, 90)))


def blank_image(size: int, rng: np.random.Generator) -> bytes:
    base = rng.integers(0, 256, size=3)
    arr = base + rng.normal(0, 2, size=(size, size, 3))
    return encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def defect_counts(n: int, proportions: dict[str, float]) -> dict[str, int]:
    unknown = set(proportions) - set(DEFAULT_DEFECTS)
    if unknown:
        raise ValueError(f"unknown defect(s) {sorted(unknown)}; known: {', '.join(DEFAULT_DEFECTS)}")
    counts = {k: int(round(n * proportions.get(k, 0.0))) for k in DEFAULT_DEFECTS}
    if sum(counts.values()) > n * 0.9:
        raise ValueError(f"defect proportions {proportions} leave under 10% of the pool clean")
    return counts


def build_pool(n: int, rng: np.random.Generator, image_size: int = 48, grid: int = 3,
               proportions: dict[str, float] | None = None):
    """The pool's samples, in crawl order. Returns ``(records, images)``: one record per sample
    (``id, image, caption, defect, source, scene`` with ``scene`` None for a blank image) and
    ``{image path: JPEG bytes}`` (paths relative to the images folder)."""
    counts = defect_counts(n, DEFAULT_DEFECTS if proportions is None else proportions)
    n_scenes = n - counts["near_duplicate"] - counts["blank_image"]
    scenes = [sample_scene(rng, grid) for _ in range(n_scenes)]
    jpegs = [encode(render(s, image_size, rng), "JPEG", quality=int(rng.integers(85, 96))) for s in scenes]
    captions = [caption(s, rng) for s in scenes]
    # which real-scene samples get a wrong or a low-information caption
    order = rng.permutation(n_scenes)
    mis = order[: counts["mismatched_caption"]]
    low = order[counts["mismatched_caption"]: counts["mismatched_caption"] + counts["low_info_caption"]]
    clean = order[counts["mismatched_caption"] + counts["low_info_caption"]:]
    recs: list[dict] = [
        {"key": i, "jpeg": jpegs[i], "caption": captions[i], "defect": "none", "source": None, "scene": scenes[i]}
        for i in range(n_scenes)
    ]
    # a derangement of the mismatched ones among themselves, plus other scenes when too few
    for k, i in enumerate(mis):
        j = int(mis[(k + 1) % len(mis)]) if len(mis) > 1 else int((i + 1) % n_scenes)
        recs[i].update(caption=captions[j], defect="mismatched_caption", source=j)
    for i in low:
        recs[i].update(caption=low_info_caption(rng), defect="low_info_caption")
    for _ in range(counts["near_duplicate"]):
        src = int(clean[int(rng.integers(len(clean)))])
        recs.append({"key": len(recs), "jpeg": near_duplicate(jpegs[src], rng), "caption": caption(scenes[src], rng),
                     "defect": "near_duplicate", "source": src, "scene": scenes[src]})
    for _ in range(counts["blank_image"]):
        other = int(rng.integers(n_scenes))
        recs.append({"key": len(recs), "jpeg": blank_image(image_size, rng), "caption": captions[other],
                     "defect": "blank_image", "source": None, "scene": None})
    # crawl order: shuffle, then name samples by their place
    perm = rng.permutation(len(recs))
    key_to_id = {int(recs[p]["key"]): f"pool-{rank:06d}" for rank, p in enumerate(perm)}
    records, images = [], {}
    for rank, p in enumerate(perm):
        r = recs[p]
        path = f"pool/{rank:06d}.jpg"
        images[path] = r["jpeg"]
        src = r["source"]
        records.append({
            "id": key_to_id[int(r["key"])],
            "image": path,
            "caption": r["caption"],
            "defect": r["defect"],
            "source": None if src is None else key_to_id[int(src)],
            "scene": r["scene"],
        })
    return records, images


def pool_sample(rec: dict) -> dict:
    """A record as a ``plain`` LLaVA sample (what stage 1 trains on)."""
    return {
        "id": rec["id"],
        "image": rec["image"],
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": rec["caption"]}],
    }
