"""Benchmark tasks: one file per benchmark, discovered; the shared base is ``base.py``.

Adding a benchmark is adding its file here: a ``Task`` subclass registered with
``@TASKS.register("name")`` beside the class (and ``paper_column`` if it is in the Bunny table).
Every module of this package except ``base`` is imported on first use of ``bunny.eval.tasks``, so
``TASKS``, ``PAPER_ORDER`` (what ``all`` runs) and the CLI help list it without further edits.
"""

from __future__ import annotations

from bunny.eval.tasks.base import (
    IMAGE,
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    TASKS,
    AnswerFile,
    Doc,
    EvalDataError,
    Task,
    as_answer_file,
    build_task,
    flatten,
    get_value,
    paper_order,
    parse_task_names,
    pct,
    read_answers,
    read_json,
    read_json_object,
)
from bunny.registry import import_parts

import_parts(__name__, __path__)

#: the registered tasks in the order of the Bunny table (RECIPE.md); ``all`` runs them in this order
PAPER_ORDER = paper_order()

__all__ = [
    "IMAGE", "MULTIPLE_CHOICE", "PAPER_ORDER", "SHORT_ANSWER", "TASKS", "AnswerFile", "Doc", "EvalDataError", "Task",
    "as_answer_file", "build_task", "flatten", "get_value", "paper_order", "parse_task_names", "pct", "read_answers",
    "read_json", "read_json_object",
]
