"""Benchmark writers: the eight benchmarks in their official layouts (../shared/BENCHMARK_FORMATS.md),
from held-out scenes. Each module has ``write(task_dir, ctx, size) -> meta``, where ``size`` is about
how many questions to write (POPE: per split; MMBench: rows, circular copies included), and meta holds
``headline``, ``metrics`` (each ``{"chance", "max"}`` in the units of the task's scores.json),
``questions`` and ``images``."""

from __future__ import annotations

import importlib

TASKS = ("mme", "pope", "gqa", "vqav2", "sqa", "seed", "mmbench", "mmmu")


def writer(task: str):
    if task not in TASKS:
        raise KeyError(f"unknown benchmark {task!r}; known: {', '.join(TASKS)}")
    return importlib.import_module(f"bunny.data.synthetic.bench.{task}")
