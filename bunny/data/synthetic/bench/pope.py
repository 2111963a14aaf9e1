"""POPE: "Is there a <object> in the image?" with three ways of choosing the absent objects.

Objects are color+shape categories ("red circle"), like COCO's categories. As POPE does: each image
(with at least two objects) gets up to three ground-truth objects as "yes" questions and as many
absent objects as "no" questions; the absent ones are drawn at random (``random``), taken from the
most frequent categories of the annotated set (``popular``), or taken from the categories that
co-occur most with the image's objects (``adversarial``). The same images serve the three splits.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import permutations
from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, metrics
from bunny.data.synthetic.questions import a
from bunny.data.synthetic.scenes import COLOR_NAMES, SHAPES

SPLITS = ("random", "popular", "adversarial")
K = 3


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 1


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    categories = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
    n_img = max(3, size // 5)
    images = []
    for k in range(n_img):
        scene = ctx.scene(min_objects=2)
        name = f"COCO_val2014_{k + 1:012d}.jpg"
        ctx.save(scene, out, f"images/{name}")
        images.append((name, sorted(scene.categories())))
    freq = Counter(c for _, cats in images for c in cats)
    cooc = Counter(pair for _, cats in images for pair in permutations(cats, 2))
    rank_popular = sorted(categories, key=lambda c: (-freq[c], c))
    n_q = 0
    for split in SPLITS:
        rows = []
        for name, cats in images:
            pos = [cats[i] for i in sorted(ctx.rng.choice(len(cats), size=min(K, len(cats)), replace=False))]
            absent = [c for c in categories if c not in cats]
            if split == "random":
                neg = [absent[i] for i in ctx.rng.choice(len(absent), size=len(pos), replace=False)]
            elif split == "popular":
                neg = [c for c in rank_popular if c not in cats][: len(pos)]
            else:
                score = {c: sum(cooc[(g, c)] for g in cats) for c in absent}
                neg = sorted(absent, key=lambda c: (-score[c], -freq[c], c))[: len(pos)]
            for p, q in zip(pos, neg):
                for obj, label in ((p, "yes"), (q, "no")):
                    rows.append({"question_id": len(rows) + 1, "image": name,
                                 "text": f"Is there {a(obj)} in the image?", "label": label})
        with open(out / f"coco_pope_{split}.json", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        n_q += len(rows)
    # random yes/no on balanced labels: precision = recall = 50%
    return {**metrics("f1", f1=(50.0, 100.0)), "questions": n_q, "images": n_img}
