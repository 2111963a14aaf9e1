"""Benchmark tasks: load the official files, build prompts, score answers the official way.

A task is three things (lmms-eval's contract, kept small):

1. ``docs()`` -- the questions, read from the files of the benchmark's official release laid out
   under a data folder (``../shared/BENCHMARK_FORMATS.md``, ``docs/evaluation.md``). Each :class:`Doc`
   has the ``question_id`` written to answers files, the user ``prompt`` (text with one ``<image>``
   placeholder per image, before any chat template), and ``images`` (paths, bytes or lazy refs).
2. ``load_images(doc)`` -- the doc's images as RGB PIL images (only the runner needs them; scoring
   never opens an image).
3. ``score(answers)`` -- ``{question_id: text}`` -> a scores dict with the keys of
   BENCHMARK_FORMATS.md (dotted names there are paths into the nested dict written as
   ``scores.json``). Every question of the benchmark counts: an unanswered question is scored
   wrong and counted in ``scores["meta"]["missing"]``; an answer whose id is not in the benchmark
   is reported (file and line) and ignored.

Tasks are registered by exact name in :data:`TASKS` (``@TASKS.register("mme")`` beside the class);
``TASKS.get("mme")(data_dir)`` builds one. This module is the shared base; the package discovers
the task files (``bunny/eval/tasks/__init__.py``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bunny.registry import Registry

logger = logging.getLogger("bunny.eval")

# Prompt suffixes of the original evaluation (LLaVA-1.5 / Bunny question files).
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
IMAGE = "<image>"


class EvalDataError(ValueError):
    """Benchmark files or an answers file are not as expected; the message names file and row."""


@dataclass
class Doc:
    """One benchmark question."""

    question_id: int | str  # as the benchmark spells it (int for VQAv2 and MMBench)
    prompt: str  # user message with one `<image>` placeholder per image
    images: list[Any] = field(default_factory=list)  # what load_images() opens
    target: Any = None  # ground truth for the scorer (None on splits without public answers)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The id as a string: answers are matched on this, whatever JSON type they carry."""
        return str(self.question_id)


@dataclass
class AnswerFile:
    """An answers JSONL file read with line numbers kept for messages."""

    path: Path | None
    texts: dict[str, str]  # key (str question id) -> text
    lines: dict[str, int]  # key -> 1-based line number (the last one, when duplicated)
    duplicates: int = 0


def read_answers(path: str | Path) -> AnswerFile:
    """Read ``{"question_id", "text", ...}`` JSON lines; a malformed line is an error naming it.

    A repeated question id keeps its last answer (a resumed run never writes one twice; another
    tool's file might) and is counted in ``duplicates``.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: answers file not found")
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    dups = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "question_id" not in obj:
                raise EvalDataError(f"{path}:{n}: expected an object with 'question_id' and 'text'")
            text = obj.get("text")
            if text is None:
                raise EvalDataError(f"{path}:{n}: answer for question_id {obj['question_id']!r} has no 'text'")
            if not isinstance(text, str):
                raise EvalDataError(f"{path}:{n}: 'text' must be a string, got {type(text).__name__}")
            key = str(obj["question_id"])
            if key in texts:
                dups += 1
            texts[key] = text
            lines[key] = n
    return AnswerFile(path, texts, lines, dups)


def as_answer_file(answers: AnswerFile | Mapping[Any, str] | str | Path) -> AnswerFile:
    if isinstance(answers, AnswerFile):
        return answers
    if isinstance(answers, (str, Path)):
        return read_answers(answers)
    texts = {str(k): v for k, v in answers.items()}
    return AnswerFile(None, texts, {}, 0)


def read_json(path: Path) -> Any:
    """``json.load`` with an error that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def read_json_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def pct(num: float, den: float) -> float:
    """100 * num / den, 0.0 for an empty denominator (no division error on an empty split)."""
    return 100.0 * num / den if den else 0.0


def is_missing_value(value: Any) -> bool:
    """None, NaN, or the strings 'nan'/'none' (how LLaVA and VLMEvalKit read empty TSV cells)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


class Task:
    """Base class. Subclasses set ``name``, implement ``_load``, ``_score`` and ``published``."""

    name: ClassVar[str] = ""
    #: column in the Bunny table (RECIPE.md): ``all`` runs and reports tasks by it; a benchmark the
    #: paper does not have keeps the default and comes after the paper's, by name
    paper_column: ClassVar[int] = 1000
    headline: ClassVar[str] = "accuracy"  # the scores key the report leads with
    headline_max: ClassVar[float] = 100.0
    max_new_tokens: ClassVar[int] = 128
    option_names: ClassVar[dict[str, str]] = {}  # option -> help text (``--option task.key=value``)

    def __init__(self, data_dir: str | Path, split: str | None = None, **options: Any) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise EvalDataError(f"{self.data_dir}: {self.name} data folder not found (see docs/evaluation.md)")
        unknown = set(options) - set(self.option_names)
        if unknown:
            known = ", ".join(sorted(self.option_names)) or "(none)"
            raise EvalDataError(f"{self.name}: unknown option(s) {sorted(unknown)}; known: {known}")
        self.split = split
        self.options = dict(options)
        self._docs: list[Doc] | None = None

    # ---- loading -------------------------------------------------------------------------
    def docs(self) -> list[Doc]:
        if self._docs is None:
            docs = self._load()
            seen: set[str] = set()
            for d in docs:
                if d.key in seen:
                    raise EvalDataError(f"{self.name}: question_id {d.question_id!r} appears twice in {self.data_dir}")
                seen.add(d.key)
            self._docs = docs
        return self._docs

    def _load(self) -> list[Doc]:
        raise NotImplementedError

    @property
    def has_targets(self) -> bool:
        """False on splits without public answers (those write a submission file instead)."""
        return any(d.target is not None for d in self.docs())

    def load_images(self, doc: Doc) -> list[Any]:
        """The doc's images as RGB PIL images (decoded with bunny's guarded loader)."""
        from bunny.data.images import load_image

        return [load_image(src) for src in doc.images]

    def missing_images(self, docs: Iterable[Doc] | None = None) -> list[str]:
        """Image files the docs name that do not exist (checked before generation starts)."""
        out = []
        for d in self.docs() if docs is None else docs:
            for src in d.images:
                if isinstance(src, Path) and not src.is_file():
                    out.append(f"{src} (question {d.question_id})")
        return out

    # ---- scoring -------------------------------------------------------------------------
    def score(self, answers: AnswerFile | Mapping[Any, str] | str | Path, docs: Sequence[Doc] | None = None,
              out_dir: str | Path | None = None) -> dict[str, Any]:
        """Score ``answers`` over ``docs`` (default: every question). Writes submission files to
        ``out_dir`` where the split has no public answers (and where the task always does)."""
        af = as_answer_file(answers)
        docs = list(self.docs() if docs is None else docs)
        known = {d.key for d in self.docs()}
        unknown = [k for k in af.texts if k not in known]
        if unknown:
            where = f"{af.path}" if af.path else "answers"
            shown = ", ".join(f"{k!r} (line {af.lines[k]})" if k in af.lines else repr(k) for k in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            logger.warning("%s: %d question id(s) not in %s (%s): %s%s; ignored", where, len(unknown), self.name,
                           self.data_dir, shown, more)
        texts = {d.key: af.texts[d.key] for d in docs if d.key in af.texts}
        missing = len(docs) - len(texts)
        if missing:
            logger.warning("%s: %d of %d question(s) have no answer; they are scored as wrong", self.name, missing,
                           len(docs))
        if af.duplicates:
            logger.warning("%s: %d question id(s) answered more than once; the last answer was kept",
                           af.path or "answers", af.duplicates)
        if any(d.target is not None for d in docs):
            scores = self._score(docs, texts)
        else:
            scores = {}
        if out_dir is not None:
            written = self.write_submission(docs, texts, Path(out_dir))
            if written:
                scores["submission"] = [str(p) for p in written]
        scores["meta"] = {
            "task": self.name,
            "split": self.split_name,
            "questions": len(docs),
            "answered": len(texts),
            "missing": missing,
            "unknown_ids": len(unknown),
            "duplicates": af.duplicates,
            "options": self.options,
        }
        return scores

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        raise NotImplementedError

    def write_submission(self, docs: list[Doc], texts: dict[str, str], out_dir: Path) -> list[Path]:
        """Write the official server's upload file(s); default: none."""
        return []

    @property
    def split_name(self) -> str | None:
        return self.split

    def published(self) -> dict[str, float]:
        """Bunny-v1.0-3B's published numbers for this split, keyed like the scores (RECIPE.md)."""
        return {}


TASKS: Registry[type[Task]] = Registry("task")


def get_value(scores: Mapping[str, Any], dotted: str) -> Any:
    """``get_value(scores, "subtasks.OCR")``: a dotted key of BENCHMARK_FORMATS.md in nested scores."""
    cur: Any = scores
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def flatten(scores: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested scores -> ``{"subtasks.OCR": 123.3, ...}`` (``meta`` and ``submission`` left out)."""
    out: dict[str, Any] = {}
    for k, v in scores.items():
        if not prefix and k in ("meta", "submission"):
            continue
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def build_task(name: str, data_dir: str | Path, split: str | None = None, **options: Any) -> Task:
    """``TASKS.get(name)(data_dir, split, **options)``, accepting the parent folder too: when
    ``data_dir/<name>/`` exists it is used (so one ``--data`` serves several tasks)."""
    cls = TASKS.get(name)
    d = Path(data_dir)
    if (d / name).is_dir():
        d = d / name
    return cls(d, split=split, **options)


def paper_order() -> tuple[str, ...]:
    """Every registered task: the paper's in the Bunny table's order, then any others by name."""
    return tuple(sorted(TASKS.names(), key=lambda n: (TASKS.get(n).paper_column, n)))


def parse_task_names(spec: str | Sequence[str]) -> list[str]:
    """``"mme,pope"`` / ``"all"`` / a list -> task names, each checked against the registry
    (an unknown one raises ``UnknownNameError`` listing the known ones)."""
    if isinstance(spec, str):
        names = list(paper_order()) if spec.strip() == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    else:
        names = list(spec)
    for n in names:
        TASKS.get(n)
    return names
