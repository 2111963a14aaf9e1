"""MMBench (EN/CN, dev/test): single-choice questions in one TSV with base64 images.

Layout: one TSV such as ``MMBench_DEV_EN.tsv`` with columns ``index, question, hint, A, B, C, D,
answer, category, l2-category, image`` (``answer`` absent on test splits). Circular copies of a
question (its options rotated) have index ``original + k * 1,000,000``; the ``image`` cell of a
copy may hold the index of the row that carries the base64 image. With several TSVs in the folder,
``--split`` names one by its stem. question_id: the index (int).

Prompt (LLaVA/Bunny ``model_vqa_mmbench.py``): ``<image>\\n``, the hint and a newline when there is
one, the question, ``X. option`` lines, then "Answer with the option's letter from the given choices
directly." (CN files: "请直接回答选项字母。").

Scoring: VLMEvalKit's exact matching, no LLM judge: an option letter standing alone as a word
(after ``.()[],:;!*#{}`` become spaces) when exactly one option letter does, else the text of
exactly one option contained in the lowercased answer; unreadable -> wrong. ``accuracy`` is
circular (a question counts only when all its copies are right); ``single_accuracy`` counts every
row; ``categories`` / ``l2_categories`` are circular. Writes ``submission.xlsx`` (the upload file:
the TSV's columns without image/hint/category, plus ``prediction``) always.
"""

from __future__ import annotations

import base64
import binascii
import re
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
    is_missing_value,
    pct,
)

CIRCULAR = 1_000_000
LETTERS = ["A", "B", "C", "D", "E", "F", "G", "H", "I"]
CN_SUFFIX = "请直接回答选项字母。"
_XLSX_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_REJECT = [
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
]


def can_infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """A standalone option letter (VLMEvalKit ``can_infer_option``; 'Z' = refused, i.e. wrong)."""
    for err in _REJECT:
        if err in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    found = [c for c in choices if c in splits]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in splits:
        return "Z"
    return None


def can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """The one option whose text is contained in the answer (VLMEvalKit ``can_infer_text``)."""
    low = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in low]
    return cands[0] if len(cands) == 1 else None


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's exact matching (``can_infer``): letter first, then option text.

    >>> ch = {"A": "cat", "B": "dog", "C": "bird"}
    >>> can_infer("B", ch), can_infer("The answer is B.", ch), can_infer("(C)", ch), can_infer("a dog", ch)
    ('B', 'B', 'C', 'B')
    >>> can_infer("A or B", ch), can_infer("", ch)
    (None, None)
    """
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


@TASKS.register("mmbench")
class MMBench(Task):
    name = "mmbench"
    paper_column = 1
    max_new_tokens = 128
    option_names = {
        "lang": "en or cn (default: cn when the file name says CN)",
        "circular": "file (default: the copies the TSV holds) or rotate (add the rotated copies a legacy TSV "
                    "lacks, as LLaVA's --all-rounds does, so a local dev score is circular too)",
    }

    def _tsv(self) -> Path:
        tsvs = sorted(self.data_dir.glob("*.tsv"))
        if self.split:
            p = self.data_dir / (self.split if self.split.endswith(".tsv") else f"{self.split}.tsv")
            if not p.is_file():
                raise EvalDataError(f"{p}: MMBench TSV not found (found: {', '.join(t.name for t in tsvs) or 'none'})")
            return p
        if len(tsvs) == 1:
            return tsvs[0]
        if not tsvs:
            raise EvalDataError(f"{self.data_dir}: no MMBench .tsv file found")
        raise EvalDataError(f"{self.data_dir}: several TSVs ({', '.join(t.name for t in tsvs)}); pick one with --split STEM")

    @property
    def split_name(self) -> str:
        return self._tsv().stem

    @property
    def lang(self) -> str:
        lang = self.options.get("lang")
        if lang:
            return str(lang).lower()
        return "cn" if re.search(r"(^|[_\-])cn([_\-.]|$)", self._tsv().stem.lower()) else "en"

    def _read(self) -> tuple[Path, list[dict[str, str]], list[str]]:
        if getattr(self, "_table", None) is None:
            self._table = self._read_tsv()
        return self._table

    def _read_tsv(self) -> tuple[Path, list[dict[str, str]], list[str]]:
        import pandas as pd

        path = self._tsv()
        try:
            # Default NA handling on purpose: VLMEvalKit and LLaVA read the TSV this way, so an
            # empty option cell (and the strings "nan"/"None") means "no such option".
            df = pd.read_csv(path, sep="\t", dtype=str)
        except pd.errors.ParserError as exc:
            raise EvalDataError(f"{path}: malformed TSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise EvalDataError(f"{path}: not UTF-8 text ({exc})") from None
        cols = list(df.columns)
        missing = [c for c in ("index", "question", "A", "B", "image") if c not in cols]
        if missing:
            raise EvalDataError(f"{path}: missing column(s) {missing}; columns are {cols}")
        rows = df.to_dict("records")
        return path, rows, cols

    def _load(self) -> list[Doc]:
        path, rows, cols = self._read()
        self._path = path
        self._images: dict[int, str] = {}
        suffix = CN_SUFFIX if self.lang == "cn" else MULTIPLE_CHOICE
        has_answer = "answer" in cols
        docs = []
        for r, row in enumerate(rows):
            line = r + 2  # 1-based, after the header line
            where = f"{path}:{line}"
            try:
                index = int(float(row["index"]))
            except (TypeError, ValueError):
                raise EvalDataError(f"{where}: index {row['index']!r} is not an integer") from None
            choices = {}
            for L in LETTERS:
                if L not in row or is_missing_value(row[L]):
                    break
                choices[L] = str(row[L])
            if len(choices) < 2:
                raise EvalDataError(f"{where} (index {index}): fewer than two options")
            image = row.get("image")
            if is_missing_value(image):
                raise EvalDataError(f"{where} (index {index}): empty image cell")
            self._images[index] = str(image)
            target = None
            if has_answer and not is_missing_value(row.get("answer")):
                target = str(row["answer"]).strip()
                if target not in choices:
                    raise EvalDataError(f"{where} (index {index}): answer {target!r} is not one of {list(choices)}")
            question = str(row["question"])
            hint = row.get("hint")
            if not is_missing_value(hint):
                question = f"{hint}\n{question}"
            opts = "\n".join(f"{k}. {v}" for k, v in choices.items())
            cat = row.get("category")
            l2 = row.get("l2-category")
            docs.append(Doc(
                question_id=index,
                prompt=f"{IMAGE}\n{question}\n{opts}\n{suffix}",  # question: hint + question
                images=[_B64Ref(self, index, where)],
                target=target,
                meta={"choices": choices, "group": index % CIRCULAR, "question": question,
                      "category": None if is_missing_value(cat) else str(cat),
                      "l2": None if is_missing_value(l2) else str(l2), "line": line},
            ))
        mode = self.options.get("circular", "file")
        if mode not in ("file", "rotate"):
            raise EvalDataError(f"mmbench: option circular must be 'file' or 'rotate', got {mode!r}")
        if mode == "rotate":
            docs = self._rotated(docs, suffix)
        return docs

    def _rotated(self, docs: list[Doc], suffix: str) -> list[Doc]:
        """Each question the TSV holds once, followed by its rotations: copy k shows original
        option k as A (LLaVA's ``options[1:] + options[:1]`` per round) and gets index
        ``original + k * 1,000,000``; its image is the original row's."""
        per_group: dict[int, int] = defaultdict(int)
        for d in docs:
            per_group[d.meta["group"]] += 1
        out: list[Doc] = []
        for d in docs:
            out.append(d)
            if per_group[d.meta["group"]] > 1 or int(d.question_id) >= CIRCULAR:
                continue  # the file already has this question's copies
            letters = list(d.meta["choices"])
            texts = list(d.meta["choices"].values())
            n = len(letters)
            for k in range(1, n):
                choices = dict(zip(letters, texts[k:] + texts[:k]))
                index = int(d.question_id) + k * CIRCULAR
                self._images[index] = str(d.question_id)
                opts = "\n".join(f"{L}. {v}" for L, v in choices.items())
                target = None if d.target is None else letters[(letters.index(d.target) - k) % n]
                ref = d.images[0]
                out.append(Doc(
                    question_id=index,
                    prompt=f"{IMAGE}\n{d.meta['question']}\n{opts}\n{suffix}",
                    images=[_B64Ref(self, index, f"{ref.where} (rotation {k})")],
                    target=target,
                    meta={**d.meta, "choices": choices},
                ))
        return out

    def _image_bytes(self, index: int, where: str) -> bytes:
        cell = self._images.get(index)
        seen = set()
        # A copy's cell may name the row that holds the image (possibly through another copy).
        while cell is not None and len(cell) < 64 and cell.strip().isdigit() and index not in seen:
            seen.add(index)
            index = int(cell.strip())
            cell = self._images.get(index)
        if cell is None:
            raise EvalDataError(f"{where}: image cell refers to index {index}, which is not in {self._path.name}")
        try:
            return base64.b64decode(cell, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise EvalDataError(f"{where}: image cell is not base64 ({exc})") from None

    def load_images(self, doc: Doc) -> list[Any]:
        from bunny.data.images import ImageError, load_image

        ref = doc.images[0]
        try:
            return [load_image(self._image_bytes(ref.index, ref.where))]
        except ImageError as exc:
            raise EvalDataError(f"{ref.where} (index {ref.index}): {exc}") from None

    def missing_images(self, docs=None) -> list[str]:
        out = []
        for d in self.docs() if docs is None else docs:
            ref = d.images[0]
            try:
                self._image_bytes(ref.index, ref.where)
            except EvalDataError as exc:
                out.append(str(exc))
        return out

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        rows_right = 0
        groups: dict[int, bool] = {}
        group_doc: dict[int, Doc] = {}
        for d in docs:
            text = texts.get(d.key)
            ok = text is not None and can_infer(text, d.meta["choices"]) == d.target
            rows_right += ok
            g = d.meta["group"]
            groups[g] = groups.get(g, True) and ok
            if g not in group_doc or d.question_id < group_doc[g].question_id:
                group_doc[g] = d
        cats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        l2s: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for g, ok in groups.items():
            d = group_doc[g]
            if d.meta["category"]:
                cats[d.meta["category"]][0] += 1
                cats[d.meta["category"]][1] += ok
            if d.meta["l2"]:
                l2s[d.meta["l2"]][0] += 1
                l2s[d.meta["l2"]][1] += ok
        out: dict[str, Any] = {
            "accuracy": pct(sum(groups.values()), len(groups)),
            "single_accuracy": pct(rows_right, len(docs)),
        }
        if cats:
            out["categories"] = {c: pct(r, n) for c, (n, r) in sorted(cats.items())}
        if l2s:
            out["l2_categories"] = {c: pct(r, n) for c, (n, r) in sorted(l2s.items())}
        return out

    def write_submission(self, docs: list[Doc], texts: dict[str, str], out_dir: Path) -> list[Path]:
        import pandas as pd

        _, rows, cols = self._read()
        keep = [c for c in cols if c not in ("hint", "category", "source", "image", "comment", "l2-category")]
        df = pd.DataFrame(rows)[keep]
        wanted = {d.key for d in docs}
        idx = [str(int(float(i))) for i in df["index"]]
        df = df[[i in wanted for i in idx]].copy()
        df["index"] = [int(float(i)) for i in df["index"]]
        opt_cols = [c for c in keep if c in LETTERS]
        at = keep.index(opt_cols[-1]) + 1 if opt_cols else len(keep)
        # Excel cells cannot hold control characters (a random or broken model emits them): drop them
        preds = [texts.get(str(i)) for i in df["index"]]
        df.insert(at, "prediction", [_XLSX_ILLEGAL.sub("", p) if isinstance(p, str) else p for p in preds])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "submission.xlsx"
        df.to_excel(path, index=False, engine="openpyxl")
        return [path]

    def published(self) -> dict[str, float]:
        name = self.split_name.lower()
        if "cn" in re.split(r"[_\-.]", name):
            return {}
        if "test" in name:
            return {"accuracy": 69.2}
        if "dev" in name:
            return {"accuracy": 68.6}
        return {}


class _B64Ref:
    __slots__ = ("task", "index", "where")

    def __init__(self, task: MMBench, index: int, where: str) -> None:
        self.task, self.index, self.where = task, index, where

    def __repr__(self) -> str:
        return f"<base64 image of index {self.index} in {self.where}>"
