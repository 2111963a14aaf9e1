"""Batched, resumable, data-parallel generation of benchmark answers, then scoring and the report.

Flow per task: load the questions (``limit`` keeps the first N) -> check every image exists (one
error listing the missing files, before any model time is spent) -> skip the questions already
answered (``answers.jsonl`` and any ``answers.rank*.jsonl`` a stopped multi-process run left) ->
generate the rest in batches, greedy, appending a line per answer as each batch finishes (flushed:
a killed run loses at most the batch in flight) -> merge into ``answers.jsonl`` in question order
-> ``scores.json`` (+ submission files) -> ``report.md`` + ``scores.png`` for the whole run.

Data parallel: under ``torchrun --nproc_per_node N``, rank r answers the pending questions
``r, r+N, r+2N, ...`` into ``answers.rank<r>.jsonl``; rank 0 merges and scores after a barrier
(gloo: no GPU collective is needed, the answers travel through the files). Greedy answers do not
depend on the batch a question lands in, so N processes give the answers one process gives.

The model side is one callable, ``generate(prompts, images, max_new_tokens) -> texts``: prompts are
the tasks' user messages with ``<image>`` placeholders (the chat template is applied inside), images
one list per prompt. :class:`ModelAnswerer` is that callable over a loaded model, through the
shared batched generator of ``bunny.infer`` (left padding, end tokens, stop strings).
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


# ---- the model side ----------------------------------------------------------------------------------
class ModelAnswerer:
    """A :data:`GenerateFn` over a loaded Bunny model: greedy (temperature 0, one beam), one
    left-padded batch per call, the model's chat template (or ``template``), its end tokens and
    stop strings. Answers are stripped, as the original ``model_vqa_loader`` strips them."""

    def __init__(self, model: Any, processor: Any, template: str | None = None, model_id: str = "bunny") -> None:
        from bunny.infer.generate import Generator, template_renderer

        self.model, self.processor, self.model_id = model, processor, model_id
        if template is None:
            self.generator = Generator(model, processor, model_id=model_id)
        else:
            from bunny.data.templates import get_template

            t = get_template(template)
            self.generator = Generator(model, processor, render=template_renderer(t), model_id=model_id,
                                       stop=t.stop_strings)

    def __call__(self, prompts: list[str], images: list[list[Any]], max_new_tokens: int) -> list[str]:
        from bunny.infer.generate import GenerationRequest, SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        reqs = [GenerationRequest([{"role": "user", "content": p}], list(imgs), params)
                for p, imgs in zip(prompts, images)]
        return [r.text.strip() for r in self.generator.generate(reqs)]


def fingerprint(model: Any) -> str:
    """8 hex digits from the first values of every weight tensor: the default ``model_id``, so a
    rerun into the same output folder resumes only with the same weights (stage 1 and stage 2 of
    one run, or two folders both named ``final``, never mix their answers)."""
    import hashlib

    h = hashlib.sha1()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def load_answerer(model_dir: str | Path, device: str | None = None, dtype: str | None = None,
                  template: str | None = None, model_id: str | None = None) -> ModelAnswerer:
    """``bunny.load_model`` + :class:`ModelAnswerer`. Default device: cuda when available; default
    dtype: bfloat16 on GPU, float32 on CPU."""
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
    return ModelAnswerer(model, processor, template,
                         model_id=model_id or f"{Path(model_dir).resolve().name}-{fingerprint(model)}")


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


def read_records(path: Path) -> dict[str, dict]:
    """``{str(question_id): record}`` of an answers file this runner wrote (empty when absent)."""
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
        records.update(read_records(p))
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


def _check_resumable(path: Path, records: dict[str, dict], docs: Sequence[Doc], model_id: str) -> None:
    """Answers kept from an earlier run must come from this model and this prompt: otherwise a
    rerun with another model or other task options would silently mix two runs."""
    by_key = {d.key: d for d in docs}
    for key, rec in records.items():
        other = rec.get("model_id")
        if other and model_id and other != model_id:
            raise EvalDataError(f"{path}: question {rec['question_id']!r} was answered by model {other!r}, not "
                                f"{model_id!r}; use another --out (or delete the file) to start over")
        d = by_key.get(key)
        if d is not None and "prompt" in rec and rec["prompt"] != d.prompt:
            raise EvalDataError(f"{path}: question {rec['question_id']!r} was asked with another prompt (other "
                                "task options or split?); use another --out (or delete the file) to start over")


# ---- the loop ----------------------------------------------------------------------------------------
@dataclass
class TaskRun:
    task: Task
    docs: list[Doc]
    answers: Path
    generated: int = 0  # answers generated by this process in this run (resumed ones not counted)
    seconds: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)


def generate_answers(task: Task, generate: GenerateFn, task_dir: Path, batch_size: int = 8,
                     limit: int | None = None, model_id: str = "", max_new_tokens: int | None = None,
                     dist: Dist | None = None, progress: bool = True) -> TaskRun:
    """Answer the task's pending questions (this rank's share), appending as it goes; merge at the end.

    An exception from ``generate`` (or a kill) leaves every finished batch in the answers file; the
    next call with the same arguments answers only the rest.
    """
    dist = dist or Dist()
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    docs = task.docs()
    if limit is not None:
        docs = docs[:limit]
    task_dir.mkdir(parents=True, exist_ok=True)
    missing = task.missing_images(docs)  # every rank checks, so every rank stops
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvalDataError(f"{task.name}: {len(missing)} image(s) not found:\n  {shown}{more}")
    main = task_dir / "answers.jsonl"
    if dist.rank == 0 and (main.exists() or list(task_dir.glob("answers.rank*.jsonl"))):
        # fold what an earlier (possibly multi-process, possibly killed) run left into answers.jsonl
        merge_answers(task_dir, task.docs())
    dist.barrier()
    records = read_records(main)
    _check_resumable(main, records, task.docs(), model_id)
    pending = [d for d in docs if d.key not in records]
    mine = pending[dist.rank::dist.world]
    out_path = main if dist.world == 1 else task_dir / f"answers.rank{dist.rank}.jsonl"
    new_tokens = max_new_tokens or task.max_new_tokens
    run = TaskRun(task, docs, main)
    if dist.rank == 0 and len(pending) < len(docs):
        logger.info("%s: %d of %d question(s) already answered in %s; resuming", task.name, len(docs) - len(pending),
                    len(docs), main)
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    bar = _progress_bar(task.name, len(pending)) if progress and dist.rank == 0 and batches else None
    t0 = time.perf_counter()
    try:
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
    finally:
        if bar is not None:
            bar.close()
    run.seconds = time.perf_counter() - t0
    dist.barrier()
    if dist.rank == 0:
        merge_answers(task_dir, task.docs())
    dist.barrier()
    return run


def _progress_bar(name: str, total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=name, unit="q", file=sys.stderr, dynamic_ncols=True)


def _load_batch(task: Task, batch: list[Doc]) -> list[list[Any]]:
    return [task.load_images(d) for d in batch]


def score_run(run: TaskRun, task_dir: Path) -> dict[str, Any]:
    """Score the run's questions from its answers file; ``scores.json`` (+ submission) in ``task_dir``."""
    from bunny.eval.report import write_scores

    run.scores = run.task.score(read_answers(run.answers), docs=run.docs, out_dir=task_dir)
    write_scores(task_dir / "scores.json", run.scores)
    return run.scores


def run_tasks(tasks: Sequence[Task], generate: GenerateFn, out_dir: str | Path, batch_size: int = 8,
              limit: int | None = None, model_id: str = "", max_new_tokens: int | None = None,
              dist: Dist | None = None, progress: bool = True, report: bool = True,
              echo: Callable[[str], None] | None = print) -> dict[str, TaskRun]:
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
            if echo:
                echo(format_table(task, run.scores))
        runs[task.name] = run
    if dist.rank == 0 and report:
        extra: dict[str, Any] = {"model": model_id, "batch size": batch_size, "processes": dist.world,
                                 "decoding": "greedy (temperature 0, one beam)"}
        if limit is not None:
            extra["limit"] = f"first {limit} questions of each task"
        for name, r in runs.items():
            if r.generated:
                extra[f"{name} generation"] = (f"{r.generated} answers in {r.seconds:.1f} s on rank 0 "
                                               f"({r.generated / max(r.seconds, 1e-9):.2f} questions/s)")
        path = write_report(out_dir, {n: (r.task, r.scores) for n, r in runs.items()}, model_id=model_id, extra=extra)
        if echo:
            echo(f"report: {path}")
    return runs
