"""Answer benchmark questions with a model and score them with the official rules.

Greedy decoding (temperature 0, one beam), batched with left padding; the batch size never changes
an answer. Answers are appended to OUT/<task>/answers.jsonl as they are produced, so a rerun of
the same command resumes where a stopped one ended. Then OUT/<task>/scores.json (and submission
files for splits without public answers), and OUT/report.md + OUT/scores.png with the published
Bunny-v1.0-3B numbers beside ours. --data is a folder holding one folder per task (named like the
task), or, for a single task, that task's folder itself; see docs/evaluation.md for each layout.
For several processes (GPUs), launch with torchrun: each takes every N-th question.

tasks: {tasks} (or "all")
task options (--option TASK.KEY=VALUE):
{options}

examples:
  bunny eval --model runs/stage2 --task mme,pope --data ~/benchmarks --out runs/eval --batch-size 16
  bunny eval --model runs/stage2 --task mmbench --data ~/benchmarks/mmbench --split MMBench_DEV_EN --out runs/eval
  torchrun --standalone --nproc_per_node 8 -m bunny.cli eval --model runs/stage2 --task gqa --data ~/benchmarks --out runs/eval
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bunny.eval.tasks import TASKS, EvalDataError, paper_order, parse_task_names


def description() -> str:
    """The help text: the module docstring with the registered tasks and their options filled in."""
    names = paper_order()
    options = [f"  {n}.{key}: {text}" for n in names for key, text in TASKS.get(n).option_names.items()]
    return __doc__.format(tasks=", ".join(names), options="\n".join(options) or "  (none)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (any layout bunny.load_model reads)")
    p.add_argument("--task", required=True, help="comma-separated task names, or 'all'")
    p.add_argument("--data", required=True, action="append",
                   help="benchmark folder: a parent holding <task>/ folders, a task's own folder, or TASK=DIR "
                        "(repeatable)")
    p.add_argument("--out", required=True, help="output folder (answers, scores, report)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each task")
    p.add_argument("--split", default=None, help="split where a task has several: NAME, or TASK=NAME[,TASK=NAME]")
    p.add_argument("--option", action="append", metavar="[TASK.]KEY=VALUE", help="a task option (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (128)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available; "
                                                  "under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--template", default=None, help="chat template name (default: the model's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_data(items: list[str], names: list[str]) -> dict[str, Path]:
    """``["~/bench", "mmbench=~/mmb"]`` -> a folder per task (``TASK=DIR`` wins over a bare DIR)."""
    out: dict[str, Path] = {}
    default = None
    for item in items:
        key, _, value = item.partition("=")
        if value and key in TASKS:
            out[key] = Path(value)
        else:
            default = Path(item)
    for n in names:
        if n not in out:
            if default is None:
                raise EvalDataError(f"no --data for task {n}")
            out[n] = default
    return out


def parse_splits(spec: str | None, names: list[str]) -> dict[str, str | None]:
    if not spec:
        return {n: None for n in names}
    if "=" not in spec:
        return {n: spec for n in names}
    out: dict[str, str | None] = {n: None for n in names}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in out:
            raise EvalDataError(f"--split {item!r}: {key!r} is not one of the tasks run ({', '.join(names)})")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from bunny.eval.api import build_tasks, evaluate
    from bunny.eval.cli_score import parse_options
    from bunny.registry import UnknownNameError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        names = parse_task_names(args.task)
        tasks = build_tasks(names, parse_data(args.data, names), parse_splits(args.split, names),
                            parse_options(args.option, names))
        evaluate(args.model, tasks, None, args.out, batch_size=args.batch_size, limit=args.limit,
                 max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, template=args.template,
                 progress=not args.no_progress)
    except (EvalDataError, UnknownNameError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
