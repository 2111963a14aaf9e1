"""ScienceQA: multiple choice with 2-5 choices, most with an image, some text-only (arithmetic).

``problems.json`` (pid -> question, choices, answer index, hint, image, task, grade, subject, topic,
category, skill, lecture, solution, split), ``pid_splits.json`` (every split the official file has;
the problems all sit in ``test``, the split that is scored) and ``images/test/<pid>/image.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, mean, metrics
from bunny.data.synthetic.questions import HINTS, QA, ask, choices_for
from bunny.data.synthetic.scenes import NUMBER_WORDS

FAMILIES = {  # family -> (topic, category, skill)
    "color": ("colors", "Identify colors", "Identify the color of an object"),
    "shape": ("shapes", "Identify shapes", "Identify the shape of an object"),
    "count": ("counting", "Count objects", "Count the objects in a picture"),
    "position": ("maps", "Read a grid", "Find where an object is"),
    "corners": ("geometry", "Properties of shapes", "Count the corners of a shape"),
    "side": ("maps", "Relative position", "Compare places of two objects"),
    "size": ("measurement", "Compare sizes", "Tell small from large"),
}
TEXT_SHARE = 0.15


def _arith(rng) -> QA:
    a, b = (int(x) for x in rng.integers(0, 6, size=2))
    return QA(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b], "arith", NUMBER_WORDS)


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 4


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    rng = ctx.rng
    fams = list(FAMILIES)
    problems, chance_img, chance_all = {}, [], []
    pid = 0
    while len(problems) < size:
        with_image = rng.random() >= TEXT_SHARE
        if with_image:
            scene = ctx.scene()
            fam = fams[int(rng.integers(len(fams)))]
            qa = ask(fam, scene, rng)
            if qa is None:
                continue
            topic, category, skill = FAMILIES[fam]
        else:
            qa, (topic, category, skill) = _arith(rng), ("arithmetic", "Add numbers", "Add two numbers")
        n = int(rng.integers(2, 6))
        choices, answer = choices_for(qa, rng, n)
        pid += 1
        key = str(pid)
        hint = HINTS[int(rng.integers(len(HINTS)))] if rng.random() < 0.3 else ""
        problems[key] = {
            "question": qa.question,
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "image": "image.png" if with_image else None,
            "task": "closed choice",
            "grade": f"grade{int(rng.integers(1, 7))}",
            "subject": "natural science" if with_image else "language science",
            "topic": topic,
            "category": category,
            "skill": skill,
            "lecture": "",
            "solution": f"The answer is {qa.answer}.",
            "split": "test",
        }
        if with_image:
            ctx.save(scene, out, f"images/test/{key}/image.png")
            chance_img.append(1.0 / len(choices))
        chance_all.append(1.0 / len(choices))
    splits = {"train": [], "val": [], "test": list(problems), "trainval": [], "minitrain": [], "minival": [],
              "minitest": []}
    with open(out / "problems.json", "w", encoding="utf-8") as f:
        json.dump(problems, f)
    with open(out / "pid_splits.json", "w", encoding="utf-8") as f:
        json.dump(splits, f)
    return {
        **metrics("img_accuracy", img_accuracy=(100 * mean(chance_img), 100.0), accuracy=(100 * mean(chance_all), 100.0)),
        "questions": len(problems),
        "images": len(chance_img),
    }
