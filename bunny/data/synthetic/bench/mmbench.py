"""MMBench (dev, English): one TSV with base64 images, a hint, options A-D and circular copies.

Columns, in order: ``index, question, hint, A, B, C, D, answer, category, l2-category, image``.
A question with n options appears n times: the original (index i) and its rotations
(index ``i + k * 1000000``, options shifted by k, answer letter moved with them). As in the real
circular TSVs, a copy's ``image`` cell holds the index of the row that carries the base64 image.
Questions with fewer than four options leave the missing option cells empty.
"""

from __future__ import annotations

import base64
import csv
from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, mean, metrics
from bunny.data.synthetic.questions import HINTS, LETTERS, ask, choices_for
from bunny.data.synthetic.scenes import encode

FILE = "MMBench_DEV_EN.tsv"
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
# category -> (families, l2-category)
CATEGORIES = {
    "image_scene": (("background",), "Coarse Perception"),
    "attribute_recognition": (("color", "shape"), "Fine-grained Single-instance Perception"),
    "object_localization": (("position", "what_at"), "Fine-grained Single-instance Perception"),
    "spatial_relationship": (("side",), "Relation Reasoning"),
    "attribute_comparison": (("size",), "Fine-grained Cross-instance Perception"),
    "physical_property_reasoning": (("corners",), "Attribute Reasoning"),
}
STRIDE = 1_000_000


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 6


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    rng = ctx.rng
    cats = list(CATEGORIES)
    rows, chance_circ, chance_single = [], [], []
    n_orig = max(2, size // 3)
    i = 0
    while i < n_orig:
        scene = ctx.scene()
        cat = cats[int(rng.integers(len(cats)))]
        fams, l2 = CATEGORIES[cat]
        qa = ask(fams[int(rng.integers(len(fams)))], scene, rng)
        if qa is None:
            continue
        opts, k = choices_for(qa, rng, 4)
        n = len(opts)
        hint = HINTS[int(rng.integers(len(HINTS)))] if rng.random() < 0.3 else ""
        image = base64.b64encode(encode(ctx.image(scene), "JPEG")).decode("ascii")
        ctx.remember(scene, str(i))
        for rot in range(n):
            shifted = opts[rot:] + opts[:rot]
            row = {
                "index": i + rot * STRIDE,
                "question": qa.question,
                "hint": hint,
                **{LETTERS[j]: (shifted[j] if j < n else "") for j in range(4)},
                "answer": LETTERS[(k - rot) % n],
                "category": cat,
                "l2-category": l2,
                "image": image if rot == 0 else str(i),
            }
            rows.append(row)
            chance_single.append(1.0 / n)
        chance_circ.append((1.0 / n) ** n)
        i += 1
    with open(out / FILE, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return {
        **metrics("accuracy", accuracy=(100 * mean(chance_circ), 100.0), single_accuracy=(100 * mean(chance_single), 100.0)),
        "questions": n_orig,
        "rows": len(rows),
        "images": n_orig,
    }
