"""Learning-rate schedules: linear warmup, then cosine / linear decay to 0, or constant.

Same curves as transformers' ``get_cosine_schedule_with_warmup`` (the original Bunny scripts use
it), written out so the formula is visible: after ``w`` warmup steps of ``N`` the multiplier at
step ``s`` is ``0.5 * (1 + cos(pi * (s - w) / (N - w)))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Warmup length: explicit steps, else ``ceil(ratio * total)`` (as transformers computes it)."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return int(math.ceil(warmup_ratio * total_steps))


def lr_multiplier(kind: str, total_steps: int, warmup: int) -> Callable[[int], float]:
    """``f(step) -> lr / peak_lr`` where ``step`` counts optimizer steps already taken (0-based)."""

    def f(step: int) -> float:
        if step < warmup:  # step 0 runs at lr 0, as in transformers
            return float(step) / float(max(1, warmup))
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / float(max(1, total_steps - warmup))
        progress = min(1.0, progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; known: cosine, linear, constant")

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, total_steps, warmup))


def resync_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's lr from the scheduler's own curve at its current step.

    After a resume the optimizer holds the lr the saved run computed for the next step; when the
    run was extended (a larger ``max_steps``/``num_train_epochs``) the curve is a new one, and the
    next step must already use it. For an unchanged curve this writes the very value loaded
    (``base_lr * f(step)``, the expression ``LambdaLR`` itself evaluates)."""
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)
