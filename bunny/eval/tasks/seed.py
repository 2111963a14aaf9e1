"""SEED-Bench (v1): multiple choice over images and videos (a video is shown as its middle frame).

Layout: ``SEED-Bench.json`` (``{"questions": [...], "question_type": {name: id}}``), images
``images/<data_id>`` (or ``SEED-Bench-image/<data_id>``, as downloaded); a video question uses the
frame ``frames/<question_id>.png`` (extract the middle frames once, e.g. with the SEED/LLaVA
``extract_video_frames.py``). question_id: the question_id.

Prompt (LLaVA-1.5's ``llava-seed-bench.jsonl``): ``<image>\\n<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..``
then "Answer with the option's letter from the given choices directly."

Scoring (LLaVA's ``convert_seed_for_submission.py``): the whole stripped output must equal the
answer letter, so "B." and "(B)" are wrong. Named non-default readings (``--option
seed.answer_rule=...``): ``lmms-eval`` (first character of the stripped output) and ``vlmevalkit``
(MMBench's exact matching: a standalone option letter, else exactly one option's text).
Writes ``submission.jsonl`` (``{"question_id", "prediction"}`` lines, the upload file) always.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
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
from bunny.eval.tasks.mmbench import can_infer

LETTERS = ["A", "B", "C", "D"]
RULES = ("official", "lmms-eval", "vlmevalkit")


def read_letter(text: str, rule: str = "official", choices: dict[str, str] | None = None) -> str:
    """The prediction compared with the answer letter under ``rule``.

    >>> read_letter(" B "), read_letter("B."), read_letter("B.", "lmms-eval"), read_letter("(B)", "lmms-eval")
    ('B', 'B.', 'B', '(')
    """
    pred = text.strip()
    if rule == "official":
        return pred
    if rule == "lmms-eval":
        return pred[0] if len(pred) > 1 else pred
    if rule == "vlmevalkit":
        return can_infer(text, dict(choices or {})) or ""
    raise ValueError(f"unknown SEED answer rule {rule!r}; known: {', '.join(RULES)}")


@TASKS.register("seed")
class SEEDBench(Task):
    name = "seed"
    paper_column = 2
    max_new_tokens = 128
    option_names = {
        "answer_rule": "official (default: whole output == letter) | lmms-eval | vlmevalkit",
        "data_types": "image,video (default: both) or image (the image part only)",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rule = self.options.get("answer_rule", "official")
        if self.rule not in RULES:
            raise EvalDataError(f"seed: answer_rule must be one of {', '.join(RULES)}, got {self.rule!r}")

    def _load(self) -> list[Doc]:
        path = self.data_dir / "SEED-Bench.json"
        if not path.is_file():
            raise EvalDataError(f"{path}: SEED-Bench file not found")
        data = read_json_object(path)
        questions = data.get("questions")
        if not isinstance(questions, list):
            raise EvalDataError(f"{path}: expected a 'questions' list")
        type_names = {int(v): k for k, v in (data.get("question_type") or {}).items()}
        wanted = {t.strip() for t in str(self.options.get("data_types", "image,video")).split(",")}
        img_dir = self.data_dir / "images"
        if not img_dir.is_dir() and (self.data_dir / "SEED-Bench-image").is_dir():
            img_dir = self.data_dir / "SEED-Bench-image"  # the folder name of the official download
        docs = []
        for i, q in enumerate(questions):
            try:
                qid, question, dtype, data_id = str(q["question_id"]), q["question"], q["data_type"], q["data_id"]
                choices = {L: q[f"choice_{L.lower()}"] for L in LETTERS}
            except (KeyError, TypeError) as exc:
                raise EvalDataError(f"{path}: question #{i}: missing field {exc}") from None
            if dtype not in ("image", "video"):
                raise EvalDataError(f"{path}: question #{i} ({qid}): data_type must be image or video, got {dtype!r}")
            if dtype not in wanted:
                continue
            answer = q.get("answer")
            if answer is not None and answer not in LETTERS:
                raise EvalDataError(f"{path}: question #{i} ({qid}): answer must be A-D, got {answer!r}")
            image = img_dir / str(data_id) if dtype == "image" else self._frame(qid)
            opts = "\n".join(f"{L}. {choices[L]}" for L in LETTERS)
            type_id = q.get("question_type_id")
            docs.append(Doc(
                question_id=qid,
                prompt=f"{IMAGE}\n{question}\n{opts}\n{MULTIPLE_CHOICE}",
                images=[image],
                target=answer,
                meta={"data_type": dtype, "choices": choices,
                      "type": type_names.get(int(type_id), str(type_id)) if type_id is not None else None},
            ))
        return docs

    def _frame(self, qid: str) -> Path:
        for ext in (".png", ".jpg"):
            p = self.data_dir / "frames" / f"{qid}{ext}"
            if p.is_file():
                return p
        return self.data_dir / "frames" / f"{qid}.png"

    def missing_images(self, docs=None) -> list[str]:
        out = super().missing_images(docs)
        if any("/frames/" in m.replace("\\", "/") for m in out):
            out.append("(video questions need their middle frame as frames/<question_id>.png; extract them, or "
                       "run the image part only with --option seed.data_types=image)")
        return out

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        types: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for d in docs:
            text = texts.get(d.key)
            ok = text is not None and read_letter(text, self.rule, d.meta["choices"]) == d.target
            for key in ("all", d.meta["data_type"]):
                counts[key][0] += 1
                counts[key][1] += ok
            if d.meta.get("type"):
                types[d.meta["type"]][0] += 1
                types[d.meta["type"]][1] += ok
        out: dict[str, Any] = {
            "accuracy": pct(counts["all"][1], counts["all"][0]),
            "image_accuracy": pct(counts["image"][1], counts["image"][0]),
            "video_accuracy": pct(counts["video"][1], counts["video"][0]),
        }
        if types:
            out["types"] = {t: pct(r, n) for t, (n, r) in sorted(types.items())}
        return out

    def write_submission(self, docs: list[Doc], texts: dict[str, str], out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "submission.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"question_id": d.question_id, "prediction": texts.get(d.key, "").strip()}) + "\n")
        return [path]

    def published(self) -> dict[str, float]:
        return {"accuracy": 62.5}
