"""SEED-Bench (v1): four-choice questions, typed by the official 12 question types.

``SEED-Bench.json`` with ``questions`` and ``question_type``; images ``images/<data_id>``. A share of
questions are ``video`` questions: their clip is absent but its middle frame is
``frames/<question_id>.png`` (what the evaluation uses); they are typed "Action Recognition" though
they ask about the frame (the world has no motion).
Types used: 1 scene (background), 2 identity (what is at a place), 3 attributes (color, shape),
4 location (where), 5 counting, 6 spatial relation (left/right/above/below), 8 reasoning (corners).
"""

from __future__ import annotations

import json
from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, metrics
from bunny.data.synthetic.questions import LETTERS, QA, ask, choices_for, refer
from bunny.data.synthetic.scenes import NUMBER_WORDS

QUESTION_TYPE = {
    "Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3, "Instance Location": 4,
    "Instances Counting": 5, "Spatial Relation": 6, "Instance Interaction": 7, "Visual Reasoning": 8,
    "Text Understanding": 9, "Action Recognition": 10, "Action Prediction": 11, "Procedure Understanding": 12,
}
TYPES = {1: ("background",), 2: ("what_at",), 3: ("color", "shape"), 4: ("position",), 5: ("count",),
         6: ("relation4",), 8: ("corners",)}
VIDEO_SHARE = 0.1


def _relation4(scene, rng) -> QA | None:
    """Where is A relative to B, for two objects sharing a row or a column: four answers."""
    objs = scene.objects
    pairs = [(a, b) for a in objs for b in objs if a is not b and (a.row == b.row or a.col == b.col)]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    if a.row == b.row:
        ans = "left" if a.col < b.col else "right"
    else:
        ans = "above" if a.row < b.row else "below"
    try:
        ra, rb = refer(scene, a, rng, "position"), refer(scene, b, rng, "position")
    except LookupError:
        return None
    return QA(f"Where is {ra} relative to {rb}?", ans, "relation4", ("left", "right", "above", "below"))


def _question(scene, rng, qtype: int) -> QA | None:
    fams = TYPES[qtype]
    fam = fams[int(rng.integers(len(fams)))]
    qa = _relation4(scene, rng) if fam == "relation4" else ask(fam, scene, rng)
    if qa is not None and len(qa.space) < 4:  # SEED always has four choices
        extra = tuple(w for w in NUMBER_WORDS[:5] if w not in qa.space)
        qa = QA(qa.question, qa.answer, qa.family, qa.space + extra)
    return qa


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 5


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    rng = ctx.rng
    types = list(TYPES)
    questions = []
    n_img = 0
    while len(questions) < size:
        scene = ctx.scene()
        video = rng.random() < VIDEO_SHARE
        qtype = types[int(rng.integers(len(types)))]
        qa = _question(scene, rng, qtype)
        if qa is None:
            continue
        qid = str(100000 + len(questions))
        opts, k = choices_for(qa, rng, 4)
        if video:
            data_id, qtype = f"v{qid}.mp4", QUESTION_TYPE["Action Recognition"]
            ctx.save(scene, out, f"frames/{qid}.png")
        else:
            data_id = f"seed_{qid}.jpg"
            ctx.save(scene, out, f"images/{data_id}")
            n_img += 1
        questions.append({
            "answer": LETTERS[k],
            "choice_a": opts[0], "choice_b": opts[1], "choice_c": opts[2], "choice_d": opts[3],
            "data_id": data_id,
            "data_type": "video" if video else "image",
            "question": qa.question,
            "question_id": qid,
            "question_type_id": qtype,
        })
    with open(out / "SEED-Bench.json", "w", encoding="utf-8") as f:
        json.dump({"questions": questions, "question_type": QUESTION_TYPE}, f)
    return {
        **metrics("accuracy", accuracy=(25.0, 100.0), image_accuracy=(25.0, 100.0), video_accuracy=(25.0, 100.0)),
        "questions": len(questions),
        "images": n_img,
    }
