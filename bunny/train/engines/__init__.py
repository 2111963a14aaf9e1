"""Engines: how one optimizer step is executed (single process, DDP, DeepSpeed ZeRO or FSDP2).

Every engine exposes the same small surface the training loop uses::

    engine.forward(**batch) -> loss          # the loss module, wrapped as the engine needs
    with engine.accumulating(last): ...      # no gradient sync until the last micro-batch
    engine.backward(loss)                    # scaled so gradients are those of the global mean loss
    engine.step() -> grad_norm               # clip, optimizer, scheduler, zero grads
    engine.save(tmp, rank) / engine.load(ckpt, rank)
    engine.lrs()                             # current lr of each parameter group

Layout, bottom to top: ``loss`` (the module every engine wraps) and ``step`` (optimizer, schedule,
the clip-update-advance step, written once) underneath; one file per engine (``local``,
``deepspeed``, ``fsdp``); :func:`build_engine` picks one (DeepSpeed and FSDP imported only when used).
"""

from __future__ import annotations

from torch import nn

from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo
from bunny.train.engines.local import LocalEngine
from bunny.train.engines.loss import LossModule

__all__ = ["LossModule", "LocalEngine", "build_engine"]


def build_engine(model: nn.Module, loss_module: LossModule, cfg: TrainConfig, dist: DistInfo,
                 total_steps: int, warmup: int, accum: int):
    kind = cfg.distributed
    if kind == "auto":
        kind = "ddp" if dist.world_size > 1 else "none"
    if kind in ("none", "ddp"):
        if kind == "none" and dist.world_size > 1:
            raise ValueError("distributed: none, but launched with several processes (torchrun)")
        return LocalEngine(model, loss_module, cfg, dist, total_steps, warmup)
    if kind == "deepspeed":
        from bunny.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, loss_module, cfg, dist, total_steps, warmup, accum)
    if kind == "fsdp":
        from bunny.train.engines.fsdp import FSDPEngine

        return FSDPEngine(model, loss_module, cfg, dist, total_steps, warmup)
    raise ValueError(f"unknown distributed mode {kind!r}")

