"""Benchmark writers: the eight benchmarks in their official layouts (../shared/BENCHMARK_FORMATS.md),
from held-out scenes. Each module has ``write(task_dir, ctx, size) -> meta``, where ``size`` is about
how many questions to write (POPE: per split; MMBench: rows, circular copies included), and meta holds
``headline``, ``metrics`` (each ``{"chance", "max"}`` in the units of the task's scores.json),
``questions`` and ``images``.

Writers are discovered: every module of this package except ``common`` is one benchmark, named
after its file, with an ``ORDER`` integer: its place in ``TASKS``, the order the world writes the
benchmarks in, which decides the random stream each one draws from (a new benchmark takes the next
number, so the others' data stay the same). Adding a benchmark is adding its file here (and its task
file in ``bunny/eval/tasks/``).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_NOT_WRITERS = {"common"}


def _discover() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_WRITERS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not isinstance(getattr(module, "ORDER", None), int) or not callable(getattr(module, "write", None)):
            raise TypeError(f"{module.__file__}: a benchmark writer needs an int ORDER and a write() function")
        found[info.name] = module
    return dict(sorted(found.items(), key=lambda kv: kv[1].ORDER))


_WRITERS = _discover()
TASKS = tuple(_WRITERS)


def writer(task: str) -> ModuleType:
    if task not in _WRITERS:
        raise KeyError(f"unknown benchmark {task!r}; known: {', '.join(TASKS)}")
    return _WRITERS[task]
