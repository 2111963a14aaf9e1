"""GQA testdev-balanced: 12,578 open questions.

Layout: ``testdev_balanced_questions.json`` (``{qid: {"imageId", "question", "answer", ...}}``, the
official questions file; ``--split NAME`` reads ``NAME_questions.json`` instead), images
``images/<imageId>.jpg``. question_id: the qid.

Scoring (LLaVA's ``convert_gqa_for_eval.py`` + the official GQA ``eval.py``): the prediction is
``text.rstrip(".").lower()`` and must equal the answer exactly. Sub-categories by the questions'
``types.structural`` / ``types.semantic`` when the file has them. A split without answers (the
challenge/test files) writes ``submission.json`` (``[{"questionId", "prediction"}]``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bunny.eval.tasks.base import IMAGE, SHORT_ANSWER, TASKS, Doc, EvalDataError, Task, pct, read_json_object


def read_answer(text: str) -> str:
    """The official reading: every trailing period dropped, lowercased.

    >>> read_answer("Yes."), read_answer("The dog..")
    ('yes', 'the dog')
    """
    return text.rstrip(".").lower()


@TASKS.register("gqa")
class GQA(Task):
    name = "gqa"
    paper_column = 5
    max_new_tokens = 128

    @property
    def split_name(self) -> str:
        return self.split or "testdev_balanced"

    def _load(self) -> list[Doc]:
        path = self.data_dir / f"{self.split_name}_questions.json"
        if not path.is_file():
            present = sorted(p.name for p in self.data_dir.glob("*_questions.json"))
            hint = f" (found: {', '.join(present)}; pick one with --split NAME)" if present else ""
            raise EvalDataError(f"{path}: GQA questions file not found{hint}")
        data = read_json_object(path)
        img_dir = self.data_dir / "images"
        docs = []
        for qid, q in data.items():
            if not isinstance(q, dict) or "imageId" not in q or "question" not in q:
                raise EvalDataError(f"{path}: question {qid!r}: expected 'imageId' and 'question'")
            types = q.get("types") or {}
            docs.append(Doc(
                question_id=str(qid),
                prompt=f"{IMAGE}\n{q['question']}\n{SHORT_ANSWER}",
                images=[img_dir / f"{q['imageId']}.jpg"],
                target=q.get("answer"),
                meta={"structural": types.get("structural"), "semantic": types.get("semantic")},
            ))
        return docs

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        right = 0
        groups: dict[str, dict[str, list[int]]] = {"structural": defaultdict(lambda: [0, 0]),
                                                   "semantic": defaultdict(lambda: [0, 0])}
        for d in docs:
            text = texts.get(d.key)
            ok = text is not None and read_answer(text) == d.target
            right += ok
            for g in groups:
                t = d.meta.get(g)
                if t:
                    groups[g][t][0] += 1
                    groups[g][t][1] += ok
        out: dict[str, Any] = {"accuracy": pct(right, len(docs))}
        for g, counts in groups.items():
            if counts:
                out[g] = {t: pct(r, n) for t, (n, r) in sorted(counts.items())}
        return out

    def write_submission(self, docs: list[Doc], texts: dict[str, str], out_dir: Path) -> list[Path]:
        if any(d.target is not None for d in docs):
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "submission.json"
        rows = [{"questionId": d.question_id, "prediction": read_answer(texts.get(d.key, ""))} for d in docs]
        path.write_text(json.dumps(rows), encoding="utf-8")
        return [path]

    def published(self) -> dict[str, float]:
        return {"accuracy": 62.5} if self.split_name == "testdev_balanced" else {}
