"""MMMU (val/test): 30 subjects, multiple-choice and open questions with up to seven images.

Layout: the Hugging Face dataset folder (``MMMU/MMMU``): ``<Subject>/<split>-*.parquet`` with columns
``id, question, options`` (a Python list written as text), ``answer, question_type``
("multiple-choice" | "open") and ``image_1`` .. ``image_7`` (``{"bytes", "path"}`` or null).
Splits: ``dev``, ``validation`` (default; ``val`` works too), ``test``. question_id: the ``id``.

Prompt (MMMU's LLaVA config, as Bunny's ``model_vqa_mmmu.py`` builds it): multiple choice is
``<question>\\n(A) ..\\n(B) ..\\n\\nAnswer with the option's letter from the given choices directly.``;
open is ``<question>\\nAnswer the question using a single word or phrase.``. Images (``--option
mmmu.images=``): ``first`` (default, the original: ``<image>\\n`` + prompt with ``image_1`` only; the
``<image k>`` tags stay as text) or ``all`` (each ``<image k>`` tag becomes an ``<image>`` placeholder
with its image, in order of appearance, as lmms-eval does for multi-image models).

Scoring (the MMMU repository's ``eval_utils.py``): ``parse_multi_choice_response`` (``(A)`` first,
then `` A `` as a word, then for answers over five words an option's text; the last occurrence
wins; nothing found -> a random option from ``random.Random(42)`` created once per scoring and
drawn in question order) and, for open questions, ``parse_open_response`` + ``eval_open`` (numbers
rounded to 2 decimals with commas dropped, words lowercased, a gold string inside a predicted
string counts). ``accuracy`` over all questions, ``subjects.<Subject>``, ``disciplines.<name>``.
The test split writes ``submission.json`` (``{id: letter or answer text}``).
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

from bunny.eval.tasks.base import IMAGE, MULTIPLE_CHOICE, SHORT_ANSWER, TASKS, Doc, EvalDataError, Task, pct

DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
SUBJECT_DISCIPLINE = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}
IMAGE_COLUMNS = [f"image_{i}" for i in range(1, 8)]
REQUIRED = ["id", "question", "options", "answer", "question_type"]
SEED = 42
_IMAGE_TAG = re.compile(r"<image (\d+)>")


# ---- answer parsing: the MMMU repository's rules ---------------------------------------------------
def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                rng: random.Random) -> str:
    """The predicted option letter. ``rng`` supplies the fallback when nothing matches.

    >>> r = random.Random(0); ch = ["A", "B", "C"]; opts = {"A": "red", "B": "green", "C": "blue"}
    >>> parse_multi_choice_response("(B)", ch, opts, r), parse_multi_choice_response("I think B.", ch, opts, r)
    ('B', 'B')
    >>> parse_multi_choice_response("The colour of the car is clearly green here", ch, opts, r)
    'B'
    """
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans = True
    with_brackets = False
    candidates = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            with_brackets = True
    if not candidates:
        for choice in all_choices:
            if f" {choice} " in response:
                candidates.append(choice)
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return rng.choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if with_brackets else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list[Any]:
    """A number -> [float rounded to 2 decimals]; a word -> [lowercased] (one character: padded)."""
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    if len(s) == 1:
        return [" " + s, s + " "]
    return [s]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(s: str) -> list[str]:
    return _NUM_COMMAS.findall(s) + _NUM_SCI.findall(s) + _NUM_SIMPLE.findall(s)


def parse_open_response(response: str) -> list[Any]:
    """Candidate answers from an open response (normalised strings and numbers)."""
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, resp in enumerate(subs):
        if i == len(subs) - 1:
            indicators = indicators + ["="]
        shortest = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    if not keys:
        keys = [response]
    preds: list[Any] = list(keys)
    for k in keys:
        preds.extend(extract_numbers(k))
    out: list[Any] = []
    for p in preds:
        out.extend(normalize_str(p))
    return list(dict.fromkeys(out))


def eval_open(gold: str | list[str], preds: list[Any]) -> bool:
    golds: list[Any] = []
    for g in gold if isinstance(gold, list) else [gold]:
        golds.extend(normalize_str(str(g)))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


def eval_multi_choice(gold: str | list[str], pred: str) -> bool:
    return pred in gold if isinstance(gold, list) else pred == gold


# ---- the task ----------------------------------------------------------------------------------------
@TASKS.register("mmmu")
class MMMU(Task):
    name = "mmmu"
    paper_column = 3
    max_new_tokens = 128
    option_names = {"images": "first (default: image_1 before the prompt, the original) or all (every <image k>)"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_mode = self.options.get("images", "first")
        if self.image_mode not in ("first", "all"):
            raise EvalDataError(f"mmmu: option images must be 'first' or 'all', got {self.image_mode!r}")
        self._image_tables: OrderedDict[Path, Any] = OrderedDict()

    @property
    def split_name(self) -> str:
        s = self.split or "validation"
        return "validation" if s == "val" else s

    def _root(self) -> Path:
        inner = self.data_dir / "MMMU"
        return inner if inner.is_dir() and not list(self.data_dir.glob("*/*.parquet")) else self.data_dir

    def _files(self) -> list[tuple[str, Path]]:
        root = self._root()
        files = sorted((p.parent.name, p) for p in root.glob(f"*/{self.split_name}-*.parquet"))
        if not files:
            found = sorted({p.name.split("-")[0] for p in root.glob("*/*.parquet")})
            hint = f" (splits found: {', '.join(found)})" if found else ""
            raise EvalDataError(f"{root}: no <Subject>/{self.split_name}-*.parquet files{hint}")
        return files

    def _load(self) -> list[Doc]:
        import pyarrow.parquet as pq

        docs = []
        for subject, path in self._files():
            try:
                names = pq.read_schema(path).names
                missing = [c for c in REQUIRED if c not in names]
                if missing:
                    raise EvalDataError(f"{path}: missing column(s) {missing}; columns are {names}")
                img_cols = [c for c in IMAGE_COLUMNS if c in names]
                table = pq.read_table(path, columns=REQUIRED)
                # which image cells are present, without reading the bytes
                present = {c: pq.read_table(path, columns=[c]).column(c).is_valid().to_pylist() for c in img_cols}
            except EvalDataError:
                raise
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise EvalDataError(f"{path}: cannot read parquet file ({exc})") from None
            for r, row in enumerate(table.to_pylist()):
                where = f"{path} row {r}"
                docs.append(self._doc(row, subject, path, r, where, {c: present[c][r] for c in img_cols}))
        return docs

    def _doc(self, row: dict, subject: str, path: Path, r: int, where: str, has_img: dict[str, bool]) -> Doc:
        qid, question, qtype = row["id"], row["question"], row["question_type"]
        if not isinstance(qid, str) or not isinstance(question, str):
            raise EvalDataError(f"{where}: id and question must be strings")
        try:
            options = ast.literal_eval(row["options"]) if row["options"] not in (None, "") else []
            if not isinstance(options, list):
                raise ValueError("not a list")
        except (ValueError, SyntaxError) as exc:
            raise EvalDataError(f"{where} (id {qid}): column 'options' is not a Python list ({exc})") from None
        options = [str(o) for o in options]
        if qtype == "multiple-choice":
            if not options:
                raise EvalDataError(f"{where} (id {qid}): multiple-choice question without options")
            letters = [chr(ord("A") + i) for i in range(len(options))]
            example = "".join(f"({L}) {o}\n" for L, o in zip(letters, options))
            prompt = f"{question}\n{example}\n{MULTIPLE_CHOICE}"
        elif qtype == "open":
            letters = []
            prompt = f"{question}\n{SHORT_ANSWER}"
        else:
            raise EvalDataError(f"{where} (id {qid}): question_type must be multiple-choice or open, got {qtype!r}")
        images: list[Any] = []
        if self.image_mode == "all":
            order = [int(k) for k in _IMAGE_TAG.findall(prompt)]
            refs = [k for k in order if has_img.get(f"image_{k}")]
            if refs:
                prompt = _IMAGE_TAG.sub(lambda m: IMAGE if has_img.get(f"image_{m.group(1)}") else m.group(0), prompt)
                images = [_ParquetImage(path, r, f"image_{k}") for k in refs]
        if not images and has_img.get("image_1"):
            prompt = f"{IMAGE}\n{prompt}"
            images = [_ParquetImage(path, r, "image_1")]
        answer = _parse_answer(row["answer"])
        return Doc(
            question_id=qid, prompt=prompt, images=images, target=answer,
            meta={"subject": subject, "type": qtype, "letters": letters,
                  "index2ans": dict(zip(letters, options))},
        )

    # images are read per file on demand (a few recent files kept)
    def load_images(self, doc: Doc) -> list[Any]:
        from bunny.data.images import ImageError, load_image

        out = []
        for ref in doc.images:
            cell = self._image_cell(ref)
            if not isinstance(cell, dict) or not cell.get("bytes"):
                raise EvalDataError(f"{ref.path} row {ref.row}: column {ref.column} has no image bytes")
            try:
                out.append(load_image(cell["bytes"]))
            except ImageError as exc:
                raise EvalDataError(f"{ref.path} row {ref.row} column {ref.column}: {exc}") from None
        return out

    def _image_cell(self, ref: _ParquetImage) -> Any:
        import pyarrow.parquet as pq

        table = self._image_tables.get(ref.path)
        if table is None:
            names = [c for c in IMAGE_COLUMNS if c in pq.read_schema(ref.path).names]
            table = pq.read_table(ref.path, columns=names)
            self._image_tables[ref.path] = table
            while len(self._image_tables) > 4:
                self._image_tables.popitem(last=False)
        else:
            self._image_tables.move_to_end(ref.path)
        return table.column(ref.column)[ref.row].as_py()

    def missing_images(self, docs=None) -> list[str]:
        return []  # image cells are checked for presence at load time

    def _predictions(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        """Parsed predictions in question order (one seeded generator for the random fallback)."""
        rng = random.Random(SEED)
        preds: dict[str, Any] = {}
        for d in docs:
            text = texts.get(d.key)
            if text is None:
                continue
            if d.meta["type"] == "multiple-choice":
                preds[d.key] = parse_multi_choice_response(text, d.meta["letters"], d.meta["index2ans"], rng)
            else:
                preds[d.key] = text
        return preds

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        preds = self._predictions(docs, texts)
        right = 0
        subjects: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for d in docs:
            p = preds.get(d.key)
            if p is None or d.target is None:
                ok = False
            elif d.meta["type"] == "multiple-choice":
                ok = eval_multi_choice(d.target, p)
            else:
                ok = eval_open(d.target, parse_open_response(p))
            right += ok
            subjects[d.meta["subject"]][0] += 1
            subjects[d.meta["subject"]][1] += ok
        disciplines: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for s, (n, r) in subjects.items():
            disc = SUBJECT_DISCIPLINE.get(s, "Other")
            disciplines[disc][0] += n
            disciplines[disc][1] += r
        return {
            "accuracy": pct(right, len(docs)),
            "subjects": {s: pct(r, n) for s, (n, r) in sorted(subjects.items())},
            "disciplines": {s: pct(r, n) for s, (n, r) in sorted(disciplines.items())},
        }

    def write_submission(self, docs: list[Doc], texts: dict[str, str], out_dir: Path) -> list[Path]:
        if any(d.target is not None for d in docs):
            return []
        preds = self._predictions(docs, texts)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "submission.json"
        path.write_text(json.dumps({d.key: preds.get(d.key, "") for d in docs}, indent=1, ensure_ascii=False),
                        encoding="utf-8")
        return [path]

    def published(self) -> dict[str, float]:
        return {"validation": {"accuracy": 38.2}, "test": {"accuracy": 33.0}}.get(self.split_name, {})


def _parse_answer(value: Any) -> str | list[str] | None:
    """The gold answer: a string, or a list for the questions whose answer cell is a list as text."""
    if value is None:
        return None
    s = str(value).strip()
    if s in ("", "?"):
        return None
    if s.startswith("[") and s.endswith("]"):
        try:
            v = ast.literal_eval(s)
            if isinstance(v, list):
                return [str(x) for x in v]
        except (ValueError, SyntaxError):
            pass
    return s


class _ParquetImage:
    __slots__ = ("path", "row", "column")

    def __init__(self, path: Path, row: int, column: str) -> None:
        self.path, self.row, self.column = path, row, column

    def __repr__(self) -> str:
        return f"<{self.column} of {self.path} row {self.row}>"
