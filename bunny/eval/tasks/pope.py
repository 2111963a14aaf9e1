"""POPE: 8,910 yes/no object-existence questions on COCO val2014, splits random/popular/adversarial.

Layout: ``coco_pope_random.json``, ``coco_pope_popular.json``, ``coco_pope_adversarial.json`` (JSON
lines ``{"question_id", "image", "text", "label"}``, as in the POPE repository's ``output/coco``),
images in ``images/`` (``val2014/`` is accepted too). question_id: ``<split>/<question_id>``.

Scoring (LLaVA's ``eval_pope.py``, the one Bunny used): keep the text before the first "."; drop
commas; split on spaces; any word exactly ``No``, ``not`` or ``no`` -> no, else yes. Per split:
accuracy, precision, recall, F1, yes-ratio (x100); the headline ``f1`` is the mean over splits.
An unanswered question counts as the wrong prediction (yes for a "no" label, and vice versa).
"""

from __future__ import annotations

import json
from typing import Any

from bunny.eval.tasks.base import IMAGE, SHORT_ANSWER, TASKS, Doc, EvalDataError, Task, pct

SPLITS = ["adversarial", "popular", "random"]


def read_yes_no(text: str) -> str:
    """The official reading of a POPE answer: 'yes' or 'no'.

    >>> read_yes_no("Yes, there is a dog."), read_yes_no("No."), read_yes_no("There is not."), read_yes_no("NO")
    ('yes', 'no', 'no', 'yes')
    """
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


@TASKS.register("pope")
class POPE(Task):
    name = "pope"
    paper_column = 7
    headline = "f1"
    max_new_tokens = 128
    option_names = {"splits": "comma-separated subset of adversarial,popular,random (default: all three)"}

    def _splits(self) -> list[str]:
        sel = self.options.get("splits") or self.split
        if not sel:
            return SPLITS
        names = [s.strip() for s in str(sel).split(",") if s.strip()]
        bad = [s for s in names if s not in SPLITS]
        if bad:
            raise EvalDataError(f"pope: unknown split(s) {bad}; known: {', '.join(SPLITS)}")
        return names

    def _load(self) -> list[Doc]:
        root = self.data_dir / "coco" if (self.data_dir / "coco").is_dir() else self.data_dir
        img_dir = root / "images"
        if not img_dir.is_dir() and (root / "val2014").is_dir():
            img_dir = root / "val2014"
        splits = self._splits()
        absent = [f"coco_pope_{s}.json" for s in splits if not (root / f"coco_pope_{s}.json").is_file()]
        if absent:
            raise EvalDataError(f"{root}: POPE file(s) missing: {', '.join(absent)}")
        docs: list[Doc] = []
        for split in splits:
            path = root / f"coco_pope_{split}.json"
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        q = json.loads(line)
                        qid, image, text, label = q["question_id"], q["image"], q["text"], q["label"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise EvalDataError(
                            f"{path}:{n}: expected a JSON object with question_id, image, text, label ({exc})") from None
                    if label not in ("yes", "no"):
                        raise EvalDataError(f"{path}:{n}: label must be 'yes' or 'no', got {label!r}")
                    docs.append(Doc(
                        question_id=f"{split}/{qid}",
                        prompt=f"{IMAGE}\n{text}\n{SHORT_ANSWER}",
                        images=[img_dir / image],
                        target=label,
                        meta={"split": split},
                    ))
        return docs

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        f1s = []
        for split in self._splits():
            tp = fp = tn = fn = 0
            n = 0
            for d in docs:
                if d.meta["split"] != split:
                    continue
                n += 1
                text = texts.get(d.key)
                if text is None:
                    pred = "no" if d.target == "yes" else "yes"
                else:
                    pred = read_yes_no(text)
                if pred == "yes":
                    tp += d.target == "yes"
                    fp += d.target == "no"
                else:
                    tn += d.target == "no"
                    fn += d.target == "yes"
            if n == 0:
                continue
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[split] = {
                "accuracy": pct(tp + tn, n),
                "precision": 100 * precision,
                "recall": 100 * recall,
                "f1": 100 * f1,
                "yes_ratio": pct(tp + fp, n),
            }
            f1s.append(100 * f1)
        return {"f1": sum(f1s) / len(f1s) if f1s else 0.0, **out}

    def published(self) -> dict[str, float]:
        return {"f1": 86.8}
