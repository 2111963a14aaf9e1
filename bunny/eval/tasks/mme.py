"""MME: 2,374 yes/no questions over 14 subtasks, two questions per image.

Layout (the official ``MME_Benchmark_release_version`` folder, or its parent): ``<subtask>/`` for
each subtask, holding either ``images/*`` + ``questions_answers_YN/<stem>.txt`` or the images and
``<stem>.txt`` side by side. Each txt line is ``question<TAB>Yes|No``.
question_id: ``<subtask>/<image file name>/<line index>``.

Scoring (the official ``calculation.py``): an answer reads as yes/no/other from its lowercased text
(exactly "yes"/"no", else "yes" or "no" inside its first four characters); per subtask
score = 100 * accuracy + 100 * accuracy+ (accuracy+: every question of an image right);
perception = sum of the 10 perception subtasks, cognition = sum of the 4 cognition subtasks.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from bunny.eval.tasks.base import IMAGE, SHORT_ANSWER, TASKS, Doc, EvalDataError, Task

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
SUBTASKS = PERCEPTION + COGNITION
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".JPG", ".JPEG", ".PNG")


def read_yes_no(text: str) -> str:
    """The official reading: 'yes', 'no' or 'other'.

    >>> read_yes_no("Yes, there is"), read_yes_no("No."), read_yes_no("not sure"), read_yes_no("The answer is yes.")
    ('yes', 'no', 'no', 'other')
    """
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@TASKS.register("mme")
class MME(Task):
    name = "mme"
    paper_column = 0
    headline = "perception"
    headline_max = 2000.0
    max_new_tokens = 128
    option_names = {"subtasks": "comma-separated subset of the 14 subtasks (default: all)"}

    def _root(self) -> Path:
        inner = self.data_dir / "MME_Benchmark_release_version"
        return inner if inner.is_dir() else self.data_dir

    def _subtasks(self) -> list[str]:
        sel = self.options.get("subtasks")
        if not sel:
            return SUBTASKS
        names = [s.strip() for s in str(sel).split(",") if s.strip()]
        bad = [s for s in names if s not in SUBTASKS]
        if bad:
            raise EvalDataError(f"mme: unknown subtask(s) {bad}; known: {', '.join(SUBTASKS)}")
        return names

    def _load(self) -> list[Doc]:
        root = self._root()
        subtasks = self._subtasks()
        absent = [s for s in subtasks if not (root / s).is_dir()]
        if absent:
            raise EvalDataError(
                f"{root}: MME subtask folder(s) missing: {', '.join(absent)} (expected all 14 subtasks of "
                "MME_Benchmark_release_version; use --option mme.subtasks=... to score a subset)")
        docs: list[Doc] = []
        for sub in subtasks:
            sdir = root / sub
            if (sdir / "images").is_dir():
                img_dir, qa_dir = sdir / "images", sdir / "questions_answers_YN"
                if not qa_dir.is_dir():
                    raise EvalDataError(f"{sdir}: has images/ but no questions_answers_YN/")
            else:
                img_dir = qa_dir = sdir
            images_by_stem: dict[str, str] = {}
            for fname in os.listdir(img_dir):
                stem, ext = os.path.splitext(fname)
                if ext in IMAGE_EXTS:
                    images_by_stem.setdefault(stem, fname)
            txts = sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt"))
            if not txts:
                raise EvalDataError(f"{qa_dir}: no question files (<stem>.txt) found")
            for txt in txts:
                stem = txt[:-4]
                image_name = images_by_stem.get(stem)
                path = qa_dir / txt
                if image_name is None:
                    raise EvalDataError(f"{path}: no image named {stem}.<jpg|png> in {img_dir}")
                with open(path, encoding="utf-8") as f:
                    rows = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
                for idx, (n, line) in enumerate(rows):
                    parts = line.split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise EvalDataError(f"{path}:{n}: expected 'question<TAB>Yes|No', got {line!r}")
                    question, answer = parts[0].strip(), parts[1].strip().lower()
                    docs.append(Doc(
                        question_id=f"{sub}/{image_name}/{idx}",
                        prompt=f"{IMAGE}\n{question}\n{SHORT_ANSWER}",
                        images=[img_dir / image_name],
                        target=answer,
                        meta={"subtask": sub, "image": image_name, "question": question},
                    ))
        return docs

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        # per subtask: [questions, right]; per image: all right?
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        images: dict[tuple[str, str], bool] = {}
        other = 0
        for d in docs:
            sub = d.meta["subtask"]
            text = texts.get(d.key)
            pred = read_yes_no(text) if text is not None else "missing"
            other += pred == "other"
            ok = pred == d.target
            c = counts[sub]
            c[0] += 1
            c[1] += ok
            img = (sub, d.meta["image"])
            images[img] = images.get(img, True) and ok
        per_image: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (sub, _), ok in images.items():
            per_image[sub][0] += 1
            per_image[sub][1] += ok
        subtasks: dict[str, float] = {}
        detail: dict[str, dict[str, float]] = {}
        for sub in SUBTASKS:
            if sub not in counts:
                continue
            n, right = counts[sub]
            n_img, img_right = per_image[sub]
            acc, acc_plus = right / n, img_right / n_img
            subtasks[sub] = 100 * acc + 100 * acc_plus
            detail[sub] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus}
        return {
            "perception": sum((v for k, v in subtasks.items() if k in PERCEPTION), 0.0),
            "cognition": sum((v for k, v in subtasks.items() if k in COGNITION), 0.0),
            "subtasks": subtasks,
            "subtask_detail": detail,
            "other_answers": other,
        }

    def published(self) -> dict[str, float]:
        return {"perception": 1488.8, "cognition": 289.3}
