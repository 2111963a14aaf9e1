"""VQAv2 (val2014 layout, scored): open questions with ten human answers each.

``v2_OpenEnded_mscoco_val2014_questions.json`` and ``v2_mscoco_val2014_annotations.json`` as the
official files; images ``images/COCO_val2014_<12-digit id>.jpg``; question ids are
``image_id * 1000 + k`` like the real ones. Counts are written as digits, as annotators wrote them
(the EvalAI answer processor turns a predicted "two" into "2"); yes/no answers are lowercase.
"""

from __future__ import annotations

import json
from pathlib import Path

from bunny.data.synthetic.bench.common import BenchContext, digits, mean, metrics
from bunny.data.synthetic.questions import ask

SPLIT = "val2014"
FAMILIES = ("color", "shape", "count", "count_attr", "exists", "background", "position", "what_at", "size")
PER_IMAGE = 3
INFO = {"description": "Synthetic world in the VQA v2.0 layout (bunny synth)", "version": "2.0", "year": 2017}
LICENSE = {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}


def _types(fam: str, question: str, answer: str) -> tuple[str, str]:
    if answer in ("yes", "no"):
        return "is there a", "yes/no"
    if fam in ("count", "count_attr"):
        return "how many", "number"
    return " ".join(question.lower().split()[:3]), "other"


#: place in ``bench.TASKS`` (the generation order; a new benchmark takes the next number)
ORDER = 3


def write(out: Path, ctx: BenchContext, size: int) -> dict:
    n_img = max(2, size // PER_IMAGE)
    qs, anns, chance = [], [], []
    used_ids: set[int] = set()
    for _ in range(n_img):
        image_id = int(ctx.rng.integers(1, 600000))
        while image_id in used_ids:
            image_id = int(ctx.rng.integers(1, 600000))
        used_ids.add(image_id)
        scene = ctx.scene()
        ctx.save(scene, out, f"images/COCO_{SPLIT}_{image_id:012d}.jpg")
        k = 0
        while k < PER_IMAGE:
            fam = FAMILIES[int(ctx.rng.integers(len(FAMILIES)))]
            qa = ask(fam, scene, ctx.rng)
            if qa is None:
                continue
            qid = image_id * 1000 + k
            answer = digits(qa.answer.lower())
            qtype, atype = _types(fam, qa.question, answer)
            qs.append({"image_id": image_id, "question": qa.question, "question_id": qid})
            anns.append({
                "question_type": qtype,
                "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                "image_id": image_id,
                "answer_type": atype,
                "question_id": qid,
            })
            chance.append(1.0 / len(qa.space))
            k += 1
    with open(out / f"v2_OpenEnded_mscoco_{SPLIT}_questions.json", "w", encoding="utf-8") as f:
        json.dump({"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE,
                   "data_subtype": SPLIT, "questions": qs}, f)
    with open(out / f"v2_mscoco_{SPLIT}_annotations.json", "w", encoding="utf-8") as f:
        json.dump({"info": INFO, "license": LICENSE, "data_subtype": SPLIT, "annotations": anns}, f)
    return {**metrics("accuracy", accuracy=(100 * mean(chance), 100.0)), "questions": len(qs), "images": n_img}
