"""FSDP2 engine (``distributed: fsdp``): every decoder layer of the LLM (and of a trained vision tower)
is its own ``fully_shard`` unit, then the whole model; weights, gradients and AdamW moments are
sharded over the processes (ZeRO-3 style), with per-parameter sharding, so frozen and LoRA
weights can share a unit.

Checkpoints are written with ``torch.distributed.checkpoint`` (one shard per process, frozen
weights excluded) inside our atomic ``step-*`` folder; the final model is gathered back to full
tensors before it is saved.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo
from bunny.train.engines.loss import LossModule
from bunny.train.engines.step import OptimizerStep, group_lrs
from bunny.train.stages import llm_of


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a transformers model (its ``_no_split_modules`` classes)."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names]


class FSDPEngine:
    kind = "fsdp"

    def __init__(self, model: nn.Module, loss_module: LossModule, cfg: TrainConfig, dist: DistInfo,
                 total_steps: int, warmup: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model = model
        self.cfg = cfg
        self.loss_module = loss_module
        model.to(dist.device)
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        if loss_module.autocast_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=loss_module.autocast_dtype,
                                                       reduce_dtype=torch.float32)
        units = _blocks(llm_of(model))
        inner = getattr(model.vision_tower, "vision_tower", None)
        if cfg.unfreeze_vision_tower and isinstance(inner, nn.Module):
            units += _blocks(inner)
        if not units:
            raise ValueError("fsdp: found no transformer blocks to shard (the LLM declares no _no_split_modules)")
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(loss_module, **kwargs)
        self.optim = OptimizerStep(model, cfg, total_steps, warmup)  # after sharding: its parameters are the DTensors
        self.optimizer, self.scheduler = self.optim.optimizer, self.optim.scheduler
        self.loss_scale = float(dist.world_size)  # FSDP averages gradients over processes

    def forward(self, **batch: Any) -> torch.Tensor:
        return self.loss_module(**batch)

    def accumulating(self, last: bool):
        self.loss_module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    def step(self) -> torch.Tensor:
        return self.optim()

    def lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer)

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.loss_module, self.optimizer,
                                            options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model_sd, "optim": optim_sd}

    def save(self, tmp: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(tmp / "dcp"))
        if rank == 0:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")

    def load(self, ckpt: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(self.loss_module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))

    def consolidate(self) -> dict[str, torch.Tensor] | None:
        """The full weights, gathered from every process, as a CPU state dict on the main process
        (keys as in the model). FSDP's own modules keep sharded storage, so the trainer loads these
        into a freshly built model to save it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.loss_module, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        return {k[len("model."):]: v for k, v in full.items()} if full else None
