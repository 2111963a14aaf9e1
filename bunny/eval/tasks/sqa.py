"""ScienceQA (the paper reports SQA-IMG: test questions with an image, 2,017 of 4,241).

Layout: ``problems.json``, ``pid_splits.json``, images ``images/<split>/<pid>/image.png`` (the
folders of ScienceQA's ``test.zip``; ``<split>/<pid>/`` directly under the data folder is accepted
too). question_id: the pid (a string).

Prompt (LLaVA-1.5's ``llava_test_CQM-A.json`` + ``--single-pred-prompt``, as Bunny ran it):
``<image>\\n`` (when the question has one), ``Context: <hint>\\n`` (when it has a hint), the question,
one ``X. choice`` line per choice, then "Answer with the option's letter from the given choices
directly."

Scoring (LLaVA's ``eval_science_qa.py``): case-sensitive; the output must be exactly an option
letter (A-E), or start with "X. ", or contain exactly one match of ``The answer is ([A-Z]).``;
anything else is wrong, as is a letter beyond the question's choices. Only the chosen split
(``test``) is scored. ``img_accuracy`` covers the questions with an image, ``accuracy`` all.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from bunny.eval.tasks.base import (
    IMAGE,
    MULTIPLE_CHOICE,
    TASKS,
    Doc,
    EvalDataError,
    Task,
    pct,
    read_json_object,
)

OPTIONS = ["A", "B", "C", "D", "E"]
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def read_letter(text: str) -> str | None:
    """The official reading of an SQA answer (None = unreadable).

    >>> read_letter("B"), read_letter("B. dog"), read_letter("The answer is C."), read_letter("(C)"), read_letter("b")
    ('B', 'B', 'C', None, None)
    """
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


@TASKS.register("sqa")
class ScienceQA(Task):
    name = "sqa"
    paper_column = 6
    headline = "img_accuracy"
    max_new_tokens = 128
    option_names = {"subset": "'all' (default: every question of the split) or 'img' (only those with an image)"}

    @property
    def split_name(self) -> str:
        return self.split or "test"

    def _load(self) -> list[Doc]:
        ppath, spath = self.data_dir / "problems.json", self.data_dir / "pid_splits.json"
        for p in (ppath, spath):
            if not p.is_file():
                raise EvalDataError(f"{p}: ScienceQA file not found")
        problems, splits = read_json_object(ppath), read_json_object(spath)
        split = self.split_name
        if split not in splits:
            raise EvalDataError(f"{spath}: no split {split!r}; known: {', '.join(sorted(splits))}")
        subset = self.options.get("subset", "all")
        if subset not in ("all", "img"):
            raise EvalDataError(f"sqa: option subset must be 'all' or 'img', got {subset!r}")
        img_root = self.data_dir / "images" / split
        if not img_root.is_dir() and (self.data_dir / split).is_dir():
            img_root = self.data_dir / split
        docs = []
        for pid in splits[split]:
            pid = str(pid)
            p = problems.get(pid)
            if p is None:
                raise EvalDataError(f"{spath}: pid {pid!r} of split {split!r} is not in {ppath.name}")
            try:
                question, choices, answer = p["question"], list(p["choices"]), p["answer"]
            except (KeyError, TypeError) as exc:
                raise EvalDataError(f"{ppath}: problem {pid!r}: expected question, choices, answer ({exc})") from None
            if not 2 <= len(choices) <= len(OPTIONS):
                raise EvalDataError(f"{ppath}: problem {pid!r}: {len(choices)} choices (expected 2-5)")
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise EvalDataError(f"{ppath}: problem {pid!r}: answer {answer!r} is not a choice index")
            image = p.get("image")
            if subset == "img" and not image:
                continue
            lines = []
            hint = (p.get("hint") or "").strip()
            if hint:
                lines.append(f"Context: {hint}")
            lines.append(question)
            lines += [f"{OPTIONS[i]}. {c}" for i, c in enumerate(choices)]
            lines.append(MULTIPLE_CHOICE)
            prompt = "\n".join(lines)
            if image:
                prompt = f"{IMAGE}\n{prompt}"
            docs.append(Doc(
                question_id=pid,
                prompt=prompt,
                images=[img_root / pid / image] if image else [],
                target=OPTIONS[answer],
                meta={"has_image": bool(image), "n_choices": len(choices), "subject": p.get("subject")},
            ))
        return docs

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        right = img_n = img_right = 0
        subjects: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for d in docs:
            text = texts.get(d.key)
            letter = read_letter(text) if text is not None else None
            ok = letter is not None and OPTIONS.index(letter) < d.meta["n_choices"] and letter == d.target
            right += ok
            if d.meta["has_image"]:
                img_n += 1
                img_right += ok
            if d.meta.get("subject"):
                subjects[d.meta["subject"]][0] += 1
                subjects[d.meta["subject"]][1] += ok
        out: dict[str, Any] = {"img_accuracy": pct(img_right, img_n), "accuracy": pct(right, len(docs))}
        if subjects:
            out["subjects"] = {s: pct(r, n) for s, (n, r) in sorted(subjects.items())}
        return out

    def published(self) -> dict[str, float]:
        return {"img_accuracy": 70.9} if self.split_name == "test" else {}
