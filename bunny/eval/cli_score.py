"""Score an answers file with a benchmark's official rules; no model, no GPU, no API key.

Prints the table (beside the published Bunny-v1.0-3B numbers) and writes scores.json (and, for
splits without public answers, the official server's submission file) to --out, by default the
answers file's folder. Unanswered questions are scored wrong and counted; ids that are not in the
benchmark are reported with their line numbers.

example:
  bunny score --task pope --data ~/data/pope --answers runs/eval/pope/answers.jsonl
  bunny score --task mmbench --data ~/data/mmbench --split MMBench_DEV_EN --answers a.jsonl --out scored/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bunny.eval.tasks import TASKS, AnswerFile, EvalDataError, read_answers
from bunny.registry import UnknownNameError


def parse_options(items: list[str] | None, task_names: list[str]) -> dict[str, dict[str, str]]:
    """``["seed.answer_rule=lmms-eval", "images=all"]`` -> ``{"seed": {...}, <every task>: {...}}``
    (an unqualified key applies to every task named that takes it)."""
    out: dict[str, dict[str, str]] = {t: {} for t in task_names}
    for item in items or []:
        if "=" not in item:
            raise EvalDataError(f"--option {item!r}: expected [task.]key=value")
        key, value = item.split("=", 1)
        if "." in key:
            task, key = key.split(".", 1)
            if task not in out:
                raise EvalDataError(f"--option {item!r}: task {task!r} is not one of {', '.join(task_names)}")
            out[task][key] = value
        else:
            for t in task_names:
                if key in TASKS.get(t).option_names:
                    out[t][key] = value
    return out


def reconcile_ids(answers: AnswerFile, known: set[str]) -> None:
    """Ids are matched as text, so ``1`` and ``"1"`` name one question. Say so where a file spells
    one id both ways (naming the lines), and count a repeated id that is not in the benchmark once,
    as unknown, not also as answered twice."""
    if answers.path is None or not answers.duplicates:
        return
    seen: dict[str, list[tuple[int, Any]]] = {}
    with open(answers.path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                qid = json.loads(line)["question_id"]
                seen.setdefault(str(qid), []).append((n, qid))
    for key, uses in seen.items():
        if len(uses) < 2:
            continue
        if len({type(q) for _, q in uses}) > 1:
            spelled = " and ".join(f"{json.dumps(q)} (line {n})" for n, q in uses)
            logging.getLogger("bunny.eval").warning(
                "%s: question_id %s are one id (ids are matched as text); the last answer, line %d, is kept",
                answers.path, spelled, uses[-1][0])
        if key not in known:
            answers.duplicates -= len(uses) - 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS.names())}")
    p.add_argument("--answers", required=True, help="answers JSONL: {\"question_id\", \"text\"} per line")
    p.add_argument("--data", required=True, help="the benchmark's folder (official layout, see docs/evaluation.md)")
    p.add_argument("--out", default=None, help="where scores.json goes (default: the answers file's folder)")
    p.add_argument("--split", default=None, help="split/file to score where a task has several (see docs/evaluation.md)")
    p.add_argument("--option", action="append", metavar="[TASK.]KEY=VALUE",
                   help="a task option, e.g. seed.answer_rule=lmms-eval (repeatable)")
    p.add_argument("--only-answered", action="store_true",
                   help="score only the questions the file answers (e.g. a --limit run) instead of all")


def run(args: argparse.Namespace) -> int:
    from bunny.eval.report import format_table, write_scores
    from bunny.eval.tasks import build_task

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        options = parse_options(args.option, [args.task])[args.task]
        task = build_task(args.task, args.data, split=args.split, **options)
        answers = read_answers(args.answers)
        docs = task.docs()
        reconcile_ids(answers, {d.key for d in docs})
        if args.only_answered:
            docs = [d for d in docs if d.key in answers.texts]
        out = Path(args.out) if args.out else Path(args.answers).resolve().parent
        scores = task.score(answers, docs=docs, out_dir=out)
    except EvalDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnknownNameError as exc:  # unknown task name
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = write_scores(out / "scores.json", scores)
    print(format_table(task, scores))
    print(f"wrote {path}")
    return 0
