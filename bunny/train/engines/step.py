"""The optimizer step, written once: AdamW with per-module learning rates, the lr schedule, gradient
clipping. Local (one process / DDP) and FSDP engines run it as is; DeepSpeed is given the same
optimizer and schedule and runs its own step (it owns the partitioned state)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bunny.train.config import TrainConfig
from bunny.train.schedule import build_scheduler
from bunny.train.stages import param_groups


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kwargs: dict[str, Any] = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr of each parameter group, by the group's name."""
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}


class OptimizerStep:
    """Optimizer + schedule over a model's trained parameters, and one ``step()``: clip, update,
    advance the schedule, drop the gradients. Built after any sharding (FSDP), so its parameters
    are the ones the model trains with."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, warmup: int, fused: bool = False):
        self.cfg = cfg
        self.optimizer = build_optimizer(model, cfg, fused=fused)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler_type, total_steps, warmup)
        self.params = trainable_params(model)

    def __call__(self) -> torch.Tensor:
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding this process's share
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm
