"""DeepSpeed ZeRO-2 / ZeRO-3 engine (``distributed: deepspeed``, ``deepspeed: configs/deepspeed/zero2.json``).

The JSON config may leave batch sizes, accumulation, clipping and bf16 as ``"auto"``; they are
filled from the training config so the two cannot disagree. The optimizer and schedule are ours
(AdamW with per-module learning rates, cosine with warmup) passed in as client objects, so a run
gives the same updates under DeepSpeed as without it. Checkpoints use DeepSpeed's own sharded
format (``deepspeed/`` inside our atomic ``step-*`` folder), frozen weights excluded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo
from bunny.train.engines.loss import LossModule
from bunny.train.engines.step import OptimizerStep, group_lrs

TAG = "state"


def resolve_ds_config(path: str | Path, cfg: TrainConfig, world_size: int, accum: int,
                      bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON with every ``"auto"`` filled from the training config; a value that
    contradicts the training config is an error (naming both)."""
    raw = json.loads(Path(path).read_text())
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.per_device_train_batch_size * accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in wanted.items():
        have = raw.get(key, "auto")
        if have == "auto":
            raw[key] = value
        elif have != value:
            raise ValueError(f"{path}: {key} is {have} but the training config gives {value}; set it to \"auto\"")
    for section, on in (("bf16", bf16), ("fp16", False)):
        sec = raw.setdefault(section, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = on
    if "optimizer" in raw or "scheduler" in raw:
        raise ValueError(f"{path}: remove the optimizer/scheduler sections; the training config's AdamW and "
                         "lr schedule are used")
    raw.setdefault("zero_allow_untested_optimizer", True)
    raw.setdefault("steps_per_print", 10**9)
    raw.setdefault("wall_clock_breakdown", False)
    return raw


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model: nn.Module, loss_module: LossModule, cfg: TrainConfig, dist: DistInfo,
                 total_steps: int, warmup: int, accum: int) -> None:
        import deepspeed

        self.model = model
        self.cfg = cfg
        self.accum = accum
        self.world = dist.world_size
        assert cfg.deepspeed is not None
        ds_cfg = resolve_ds_config(cfg.deepspeed, cfg, dist.world_size, accum,
                                   bf16=loss_module.autocast_dtype == torch.bfloat16)
        self.stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        if ds_cfg["bf16"]["enabled"]:
            # DeepSpeed's bf16 mode keeps bf16 weights with fp32 master copies; our autocast is then redundant
            loss_module.autocast_dtype = None
        ours = OptimizerStep(model, cfg, total_steps, warmup)  # DeepSpeed runs the step, on our optimizer and schedule
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=loss_module, optimizer=ours.optimizer, lr_scheduler=ours.scheduler, config=ds_cfg,
            dist_init_required=False)
        self._last = True

    def forward(self, **batch: Any) -> torch.Tensor:
        return self.engine(**batch)

    def accumulating(self, last: bool):
        import contextlib

        self._last = last
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over processes; our loss is already a share of the global mean.
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        if not self._last:
            self.engine.step()  # DeepSpeed counts micro-steps; it only updates at the boundary

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    def lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer)

    def save(self, tmp: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, ckpt: Path, rank: int) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag=TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{ckpt}: no DeepSpeed checkpoint to resume from")

    def consolidate(self) -> None:  # noqa: D401
        """ZeRO-3 partitions every weight: gather them back into the model (on every process), so the
        final folder is written from full tensors. ZeRO-2 keeps full weights already."""
        if self.stage < 3:
            return
        import deepspeed

        params = list(self.model.parameters())
        full = []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = [p.data.detach().clone() for p in params]
        for p, t in zip(params, full):
            p.data = t
        return None
