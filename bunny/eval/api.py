"""``evaluate(...)``: the Python entry point of ``bunny eval`` (used by the CLI and the demo).

    from bunny.eval import evaluate
    scores = evaluate("runs/stage2", "mme,pope", "runs/world/bench", "runs/eval", batch_size=8)
    scores["pope"]["f1"], scores["mme"]["perception"]

Why one function: the demo, notebooks and the CLI must run the same steps in the same order
(benchmark files checked before the model is loaded, answers resumable, scores and report
written), so a score printed by the demo is the score ``bunny eval`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bunny.eval.runner import (
    Dist,
    GenerateFn,
    ModelAnswerer,
    fingerprint,
    init_distributed,
    load_answerer,
    run_tasks,
)
from bunny.eval.tasks import EvalDataError, Task, build_task, parse_task_names

ModelSpec = str | Path | tuple[Any, Any] | GenerateFn


def build_tasks(tasks: str | Sequence[str | Task], data: str | Path | Mapping[str, str | Path] | None,
                split: str | Mapping[str, str | None] | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Task]:
    """Task objects from names (``"mme,pope"``, ``"all"`` or a list; Task objects pass through),
    each reading ``data`` (one folder for all, the parent of ``<task>/`` folders, or a mapping
    task -> folder). Every task's files are read and checked here."""
    names: list[str | Task] = list(parse_task_names(tasks)) if isinstance(tasks, str) else list(tasks)
    if not names:
        raise EvalDataError("no task given")
    out: list[Task] = []
    for t in names:
        if isinstance(t, Task):
            out.append(t)
            continue
        parse_task_names([t])  # unknown -> error listing the known ones
        folder = data.get(t) if isinstance(data, Mapping) else data
        if folder is None:
            raise EvalDataError(f"no data folder for task {t}")
        s = split.get(t) if isinstance(split, Mapping) else split
        out.append(build_task(t, folder, split=s, **dict((options or {}).get(t, {}))))
    seen = set()
    for task in out:
        if task.name in seen:
            raise EvalDataError(f"task {task.name} given twice (its answers would share {task.name}/)")
        seen.add(task.name)
        task.docs()  # bad benchmark files fail here, before any model is loaded
    return out


def evaluate(model: ModelSpec, tasks: str | Sequence[str | Task], data: str | Path | Mapping[str, str | Path] | None,
             out_dir: str | Path, batch_size: int = 8, limit: int | None = None,
             split: str | Mapping[str, str | None] | None = None,
             options: Mapping[str, Mapping[str, Any]] | None = None, max_new_tokens: int | None = None,
             device: str | None = None, dtype: str | None = None, template: str | None = None,
             model_id: str | None = None, progress: bool = False, report: bool = True,
             quiet: bool = False) -> dict[str, dict[str, Any]]:
    """Answer, score and report; returns ``{task: scores}`` (the ``scores.json`` of each task).

    ``model``: a model folder (anything ``bunny.load_model`` reads), a loaded ``(model, processor)``
    pair, or any ``generate(prompts, images, max_new_tokens) -> texts`` callable. ``model_id`` (default:
    the folder name and a fingerprint of the weights) is written with every answer; a rerun into
    ``out_dir`` resumes only with the same id. Files go to
    ``out_dir/<task>/{answers.jsonl, scores.json}`` and ``out_dir/report.md``, ``scores.png``;
    rerunning with the same arguments resumes. Under torchrun every rank calls this; rank 0 returns
    the scores, the other ranks an empty dict.
    """
    task_list = build_tasks(tasks, data, split, options)
    dist: Dist = init_distributed()
    if isinstance(model, (str, Path)):
        if device is None and dist.world > 1:
            import torch

            device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
        answerer = load_answerer(model, device=device, dtype=dtype, template=template, model_id=model_id)
        generate: GenerateFn = answerer
        model_id = answerer.model_id
    elif isinstance(model, tuple):
        model_id = model_id or f"bunny-{fingerprint(model[0])}"
        generate = ModelAnswerer(model[0], model[1], template, model_id=model_id)
    elif callable(model):
        generate = model
        model_id = model_id or getattr(model, "model_id", "") or ""
    else:
        raise TypeError(f"model must be a folder, a (model, processor) pair or a callable, got {type(model).__name__}")
    runs = run_tasks(task_list, generate, out_dir, batch_size=batch_size, limit=limit, model_id=model_id,
                     max_new_tokens=max_new_tokens, dist=dist, progress=progress, report=report,
                     echo=None if quiet else print)
    if dist.rank != 0:
        return {}
    return {name: r.scores for name, r in runs.items()}
