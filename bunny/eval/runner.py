"""Batched, resumable, data-parallel generation of benchmark answers, then scoring and the report.

Flow per task: load the questions (``--limit`` keeps the first N) -> check every image exists (one
error listing the missing files, before any model time is spent) -> skip the questions already
answered (``answers.jsonl`` and any ``answers.rank*.jsonl`` a stopped multi-process run left) ->
generate the rest in batches, greedy, appending a line per answer as each batch finishes (flushed:
a killed run loses at most the batch in flight) -> merge into ``answers.jsonl`` in question order
-> ``scores.json`` (+ submission files) -> ``report.md`` + ``scores.png`` for the whole run.

Data parallel: under ``torchrun --nproc_per_node N``, rank r answers the pending questions
``r, r+N, r+2N, ...`` into ``answers.rank<r>.jsonl``; rank 0 merges and scores after a barrier
(gloo: no GPU collective is needed, the answers travel through the files).

The model side is one callable, ``generate(prompts, images, max_new_tokens) -> texts``: prompts are
the tasks' user messages with ``<image>`` placeholders (the chat template is applied inside), images
one list per prompt. :func:`model_generator` builds it from a model folder with ``bunny.load_model``
and the batched generator of ``bunny.infer``; tests and other engines can pass their own.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bunny.eval.tasks import Doc, EvalDataError, Task, read_answers

logger = logging.getLogger("bunny.eval")

GenerateFn = Callable[[list[str], list[list[Any]], int], list[str]]

# The `bunny` chat template (RECIPE.md), used only when bunny.data.templates is not importable.
_BUNNY_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


# ---- the model side ----------------------------------------------------------------------------------
def chat_renderer(template_name: str | None) -> Callable[[str], str]:
    """``user text -> prompt text`` with the named chat template (``bunny.data.templates``), for a
    single user turn followed by the assistant's generation prompt."""
    try:
        from bunny.data.templates import TEMPLATES
    except ImportError:  # the templates package is optional for this adapter
        TEMPLATES = None  # noqa: N806
    if TEMPLATES is not None:
        template = TEMPLATES.get(template_name or "bunny")
        if isinstance(template, type):
            template = template()

        def render(text: str) -> str:
            return template.render([{"role": "user", "content": text}], add_generation_prompt=True)

        return render
    if template_name not in (None, "bunny"):
        raise RuntimeError(f"chat template {template_name!r} needs bunny.data.templates, which is not installed")

    def render_bunny(text: str) -> str:
        return f"{_BUNNY_SYSTEM} USER: {text} ASSISTANT:"

    return render_bunny


def model_generator(model: Any, processor: Any, template: str | None = None) -> GenerateFn:
    """A :data:`GenerateFn` over a loaded Bunny model: greedy (temperature 0, one beam), one
    left-padded batch per call, the model's chat template, end tokens and stop strings honoured."""
    from bunny.infer.generate import GenerationRequest, Generator, SamplingParams

    name = template or getattr(model.config, "chat_template", None)
    render_text = chat_renderer(name)

    def render(messages: list[dict[str, str]]) -> str:
        return render_text(messages[-1]["content"])

    gen = Generator(model, processor, render=render)
    stops: tuple[str, ...] = ()
    try:
        from bunny.data.templates import TEMPLATES

        t = TEMPLATES.get(name or "bunny")
        stops = tuple(getattr(t() if isinstance(t, type) else t, "stop_strings", ()) or ())
    except (ImportError, KeyError):
        pass

    def generate(prompts: list[str], images: list[list[Any]], max_new_tokens: int) -> list[str]:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stops)
        reqs = [GenerationRequest([{"role": "user", "content": p}], list(imgs), params) for p, imgs in zip(prompts, images)]
        return [r.text.strip() for r in gen.generate(reqs)]

    return generate


def load_generator(model_dir: str | Path, device: str | None = None, dtype: str | None = None,
                   template: str | None = None) -> GenerateFn:
    import torch

    from bunny import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(dtypes)}")
    model, processor = load_model(str(model_dir), dtype=dtypes[dtype], device=device)
    model.eval()
    return model_generator(model, processor, template)


# ---- distributed helpers -----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed() -> Dist:
    """Rank and world size from torchrun's environment; a gloo group for barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        # generous timeout: ranks wait for each other at the end of a task, which can take hours
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---- answers files -----------------------------------------------------------------------------------
def _repair(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appending continues cleanly."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path,
                       len(data) - cut)
        f.truncate(cut)


def _read_records(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[str(rec["question_id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalDataError(f"{path}:{n}: not an answer record; move the file away to start over") from None
    return out


def merge_answers(task_dir: Path, docs: Sequence[Doc]) -> Path:
    """``answers.jsonl`` + ``answers.rank*.jsonl`` -> ``answers.jsonl`` in question order (records
    for ids outside ``docs`` are kept at the end); the rank files are removed."""
    main = task_dir / "answers.jsonl"
    parts = sorted(task_dir.glob("answers.rank*.jsonl"))
    records: dict[str, dict] = {}
    for p in [main, *parts]:
        _repair(p)
        records.update(_read_records(p))
    order = {d.key: i for i, d in enumerate(docs)}
    keys = sorted(records, key=lambda k: (order.get(k, len(order)), k))
    tmp = task_dir / "answers.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for k in keys:
            f.write(json.dumps(records[k], ensure_ascii=False) + "\n")
    os.replace(tmp, main)
    for p in parts:
        p.unlink()
    return main


# ---- the loop ----------------------------------------------------------------------------------------
@dataclass
class TaskRun:
    task: Task
    docs: list[Doc]
    answers: Path
    generated: int = 0
    seconds: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)


def generate_answers(task: Task, generate: GenerateFn, task_dir: Path, batch_size: int = 8,
                     limit: int | None = None, model_id: str = "", max_new_tokens: int | None = None,
                     dist: Dist | None = None, progress: bool = True, max_batches: int | None = None) -> TaskRun:
    """Answer the task's pending questions (this rank's share), appending as it goes; merge at the end.

    ``max_batches`` stops early (for tests of resuming after an interruption).
    """
    dist = dist or Dist()
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    docs = task.docs()
    if limit is not None:
        docs = docs[:limit]
    task_dir.mkdir(parents=True, exist_ok=True)
    missing = task.missing_images(docs)  # every rank checks, so every rank stops
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvalDataError(f"{task.name}: {len(missing)} image(s) not found:\n  {shown}{more}")
    if dist.rank == 0:
        # fold what an earlier (possibly multi-process, possibly killed) run left into answers.jsonl
        if (task_dir / "answers.jsonl").exists() or list(task_dir.glob("answers.rank*.jsonl")):
            merge_answers(task_dir, task.docs())
    dist.barrier()
    done = set(_read_records(task_dir / "answers.jsonl"))
    pending = [d for d in docs if d.key not in done]
    mine = pending[dist.rank::dist.world]
    out_path = task_dir / "answers.jsonl" if dist.world == 1 else task_dir / f"answers.rank{dist.rank}.jsonl"
    new_tokens = max_new_tokens or task.max_new_tokens
    run = TaskRun(task, docs, task_dir / "answers.jsonl")
    if dist.rank == 0 and done:
        logger.info("%s: %d of %d question(s) already answered; resuming", task.name, len(docs) - len(pending), len(docs))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    bar = None
    if progress and dist.rank == 0 and batches:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc=f"{task.name}", unit="q", file=sys.stderr,
                       initial=0, dynamic_ncols=True)
        except ImportError:
            bar = None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool, open(out_path, "a", encoding="utf-8") as f:
        # images of the next batch decode on a thread while the model works on this one
        nxt = pool.submit(_load_batch, task, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            images = nxt.result()
            nxt = pool.submit(_load_batch, task, batches[b + 1]) if b + 1 < len(batches) else None
            texts = generate([d.prompt for d in batch], images, new_tokens)
            if len(texts) != len(batch):
                raise RuntimeError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
            for d, text in zip(batch, texts):
                f.write(json.dumps({"question_id": d.question_id, "prompt": d.prompt, "text": text,
                                    "model_id": model_id}, ensure_ascii=False) + "\n")
            f.flush()
            run.generated += len(batch)
            if bar is not None:
                bar.update(len(batch) * dist.world)
    run.seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    dist.barrier()
    if dist.rank == 0:
        merge_answers(task_dir, task.docs())
    dist.barrier()
    return run


def _load_batch(task: Task, batch: list[Doc]) -> list[list[Any]]:
    return [task.load_images(d) for d in batch]


def score_run(run: TaskRun, task_dir: Path) -> dict[str, Any]:
    from bunny.eval.report import write_scores

    answers = read_answers(run.answers)
    run.scores = run.task.score(answers, docs=run.docs, out_dir=task_dir)
    write_scores(task_dir / "scores.json", run.scores)
    return run.scores


def evaluate(tasks: Sequence[Task], generate: GenerateFn, out_dir: str | Path, batch_size: int = 8,
             limit: int | None = None, model_id: str = "", max_new_tokens: int | None = None,
             dist: Dist | None = None, progress: bool = True, report: bool = True) -> dict[str, TaskRun]:
    """Run every task (answers in ``out_dir/<task>/``), score them, write the report (rank 0)."""
    from bunny.eval.report import format_table, write_report

    dist = dist or Dist()
    out_dir = Path(out_dir)
    runs: dict[str, TaskRun] = {}
    for task in tasks:
        task_dir = out_dir / task.name
        run = generate_answers(task, generate, task_dir, batch_size=batch_size, limit=limit, model_id=model_id,
                               max_new_tokens=max_new_tokens, dist=dist, progress=progress)
        if dist.rank == 0:
            score_run(run, task_dir)
            print(format_table(task, run.scores), flush=True)
        runs[task.name] = run
    if dist.rank == 0 and report:
        extra = {"model": model_id, "batch size": batch_size, "processes": dist.world,
                 "decoding": "greedy (temperature 0, one beam)"}
        if limit is not None:
            extra["limit"] = f"first {limit} questions of each task"
        path = write_report(out_dir, {n: (r.task, r.scores) for n, r in runs.items()}, model_id=model_id, extra=extra)
        print(f"report: {path}", flush=True)
    return runs
