"""One process, or DDP (every process holds the whole model and the whole optimizer state)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunny.train import checkpointing as ckpt_io
from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo
from bunny.train.engines.loss import LossModule
from bunny.train.engines.step import OptimizerStep, group_lrs


class LocalEngine:
    """One process, or DDP (every process holds the whole model and the whole optimizer state)."""

    kind = "local"

    def __init__(self, model: nn.Module, loss_module: LossModule, cfg: TrainConfig, dist: DistInfo,
                 total_steps: int, warmup: int) -> None:
        self.model = model
        self.cfg = cfg
        self.dist = dist
        self.optim = OptimizerStep(model, cfg, total_steps, warmup, fused=dist.device.type == "cuda")
        self.optimizer, self.scheduler = self.optim.optimizer, self.optim.scheduler
        self.ddp = dist.world_size > 1
        if self.ddp:
            self.kind = "ddp"
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            # every trained weight gets a gradient in every micro-batch (text-only ones get a blank image
            # row, see LossModule), so DDP needs no unused-parameter search
            self.forward_module: nn.Module = DDP(loss_module, device_ids=device_ids, find_unused_parameters=False)
        else:
            self.forward_module = loss_module
        self.loss_scale = float(dist.world_size)

    def forward(self, **batch: Any) -> torch.Tensor:
        return self.forward_module(**batch)

    def accumulating(self, last: bool):
        if self.ddp and not last:
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if loss.requires_grad:  # one process, stage 1, text-only micro-batch: nothing trained is involved
            (loss * self.loss_scale).backward()

    def step(self) -> torch.Tensor:
        return self.optim()

    def lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, tmp: Path, rank: int) -> None:
        if rank == 0:
            ckpt_io.save_trainable(tmp, self.model)
            ckpt_io.save_optimizer(tmp, self.model, self.optimizer, self.scheduler)

    def load(self, ckpt: Path, rank: int) -> None:
        ckpt_io.load_trainable(ckpt, self.model)
        ckpt_io.load_optimizer(ckpt, self.model, self.optimizer, self.scheduler)

    def consolidate(self) -> None:
        """Nothing to gather: the model holds its full weights on every process (returns None; a
        sharded engine returns the gathered state dict instead)."""
