"""Evaluation: the paper's eight benchmarks from their official files, scored by the official rules.

``bunny.eval.evaluate(model, tasks, data, out_dir, batch_size)`` answers, scores and reports
(:mod:`bunny.eval.api`); ``bunny.eval.tasks`` holds the benchmarks, ``runner`` the batched,
resumable generation loop, ``report`` the tables and the chart. See docs/evaluation.md.
Importing this package does not import torch (only running a model does).
"""

from __future__ import annotations

from bunny.eval.api import evaluate

__all__ = ["evaluate"]
