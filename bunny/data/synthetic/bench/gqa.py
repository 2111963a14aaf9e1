"""GQA testdev-balanced: open questions about attributes and relations, answers lowercase words.

``testdev_balanced_questions.json`` maps a question id to ``imageId``, ``question``, ``answer``,
``fullAnswer``, ``types`` and the other keys of the official file; images are
``images/<imageId>.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, mean, metrics
from bunny.data.synthetic.questions import ask

# family -> (structural type, semantic type)
FAMILIES = {
    "color": ("query", "attr"), "shape": ("query", "obj"), "size": ("choose", "attr"),
    "side": ("choose", "rel"), "what_at": ("query", "obj"), "position": ("query", "rel"),
    "exists": ("verify", "obj"), "relation": ("verify", "rel"),
}
PER_IMAGE = 2


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 2


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    n_img = max(2, size // PER_IMAGE)
    fams = list(FAMILIES)
    questions, chance = {}, []
    for k in range(n_img):
        scene = ctx.scene(min_objects=1)
        image_id = f"n{100000 + k}"
        ctx.save(scene, out, f"images/{image_id}.jpg")
        asked = 0
        while asked < PER_IMAGE:
            fam = fams[int(ctx.rng.integers(len(fams)))]
            qa = ask(fam, scene, ctx.rng)
            if qa is None:
                continue
            qid = str(20000000 + len(questions))
            answer = qa.answer.lower()
            structural, semantic = FAMILIES[fam]
            questions[qid] = {
                "semantic": [],
                "entailed": [],
                "equivalent": [qid],
                "question": qa.question,
                "imageId": image_id,
                "isBalanced": True,
                "groups": {"global": None, "local": f"{structural}-{fam}"},
                "answer": answer,
                "semanticStr": "",
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": fam, "semantic": semantic, "structural": structural},
                "fullAnswer": f"The answer is {answer}.",
            }
            chance.append(1.0 / len(qa.space))
            asked += 1
    with open(out / "testdev_balanced_questions.json", "w", encoding="utf-8") as f:
        json.dump(questions, f)
    return {**metrics("accuracy", accuracy=(100 * mean(chance), 100.0)), "questions": len(questions), "images": n_img}
