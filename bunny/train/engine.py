"""How one optimizer step is executed: single process, DDP, DeepSpeed ZeRO or FSDP2.

Every engine exposes the same small surface the training loop uses::

    engine.forward(**batch) -> loss          # the loss module, wrapped as the engine needs
    with engine.accumulating(last): ...      # no gradient sync until the last micro-batch
    engine.backward(loss)                    # scaled so gradients are those of the global mean loss
    engine.step() -> grad_norm               # clip, optimizer, scheduler, zero grads
    engine.save(tmp, rank) / engine.load(ckpt, rank)
    engine.lrs()                             # current lr of each parameter group

Loss scaling: the loss of a micro-batch is ``sum of its token losses / targets in the whole global
batch`` (all micro-batches, all processes), so the *sum* of the micro-batch gradients over all
processes is the gradient of the global mean. DDP, DeepSpeed and FSDP average gradients over
processes (and DeepSpeed also over accumulation steps), so ``backward`` multiplies by what they
divide by. This is what makes a 2-process run equal a 1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bunny.train import checkpointing as ckpt_io
from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo
from bunny.train.schedule import build_scheduler
from bunny.train.stages import param_groups


class LossModule(nn.Module):
    """``BunnyForConditionalGeneration`` + the step's inputs -> the micro-batch loss.

    A module of its own so DDP/DeepSpeed/FSDP wrap one forward that includes the projector over
    cached features (stage 1 with a feature cache) and the autocast region.
    """

    def __init__(self, model: nn.Module, supervised_only: bool, autocast_dtype: torch.dtype | None,
                 device: torch.device, blank_images: str = "none"):
        super().__init__()
        if blank_images not in ("none", "projector", "tower"):
            raise ValueError(f"blank_images must be none, projector or tower, got {blank_images!r}")
        self.model = model
        self.supervised_only = supervised_only
        self.autocast_dtype = autocast_dtype
        self.device_type = device.type
        self.blank_images = blank_images

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        num_items: torch.Tensor | int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.blank_images != "none" and pixel_values is None and image_features is None:
            input_ids, labels, attention_mask, position_ids, pixel_values, image_features = self._with_blank_row(
                input_ids, labels, attention_mask, position_ids)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            projected = None
            if image_features is not None:  # cached encoder outputs: only the projector runs
                projected = self.model.mm_projector(image_features)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                image_features=projected,
                labels=labels,
                use_cache=False,  # no cache: the mask code detects packed rows from position_ids
                supervised_logits_only=self.supervised_only,
                num_items_in_batch=num_items,
            )
        return out.loss

    def _with_blank_row(self, input_ids, labels, attention_mask, position_ids):
        """A text-only micro-batch skips the image path that another process's micro-batch runs: DDP
        buckets, ZeRO partitions and ZeRO-3/FSDP parameter gathers then differ between processes
        (wrong sums, or a hang). So under several processes such a batch gets one extra row: a blank
        image's tokens, attending only to themselves, without labels. Every process then runs the
        same modules in the same order; the loss and gradients are unchanged (the row has no
        targets, and the loss denominator is fixed by the plan).

        ``blank_images``: ``tower`` (pixels through the vision tower) or ``projector`` (cached or
        frozen features: zeros straight into the projector)."""
        m = self.model
        n_tok = int(m.config.num_image_tokens)
        width = max(int(input_ids.shape[1]), n_tok)
        dev = input_ids.device

        def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
            if t.shape[1] == width:
                return t
            pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=dev)
            return torch.cat([t, pad], dim=1)

        row = torch.full((1, width), int(m.config.image_token_id), dtype=input_ids.dtype, device=dev)
        pad_id = int(input_ids[0, -1]) if attention_mask is None else 0
        row[0, n_tok:] = pad_id
        new_ids = torch.cat([widen(input_ids, pad_id), row])
        new_labels = torch.cat([widen(labels, IGNORE), torch.full((1, width), IGNORE, dtype=labels.dtype, device=dev)])
        if attention_mask is not None:
            mask_row = torch.zeros((1, width), dtype=attention_mask.dtype, device=dev)
            mask_row[0, :n_tok] = 1
            attention_mask = torch.cat([widen(attention_mask, 0), mask_row])
        if position_ids is not None:
            if position_ids.shape[1] < width:  # extra padding of packed rows: a segment of its own
                extra = torch.arange(width - position_ids.shape[1], device=dev).expand(position_ids.shape[0], -1)
                position_ids = torch.cat([position_ids, extra], dim=1)
            pos_row = torch.cat([torch.arange(n_tok, device=dev), torch.arange(width - n_tok, device=dev)])
            position_ids = torch.cat([position_ids, pos_row.unsqueeze(0)])
        if self.blank_images == "tower":
            size = int(m.config.image_size)
            return new_ids, new_labels, attention_mask, position_ids, torch.zeros(1, 3, size, size, device=dev), None
        dtype = next(m.mm_projector.parameters()).dtype
        feats = torch.zeros(1, m.vision_tower.num_tokens, m.vision_tower.hidden_size, device=dev, dtype=dtype)
        return new_ids, new_labels, attention_mask, position_ids, None, feats


IGNORE = -100


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kwargs: dict[str, Any] = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


class LocalEngine:
    """One process, or DDP (every process holds the whole model and the whole optimizer state)."""

    kind = "local"

    def __init__(self, model: nn.Module, loss_module: LossModule, cfg: TrainConfig, dist: DistInfo,
                 total_steps: int, warmup: int) -> None:
        self.model = model
        self.cfg = cfg
        self.dist = dist
        self.optimizer = build_optimizer(model, cfg, fused=dist.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler_type, total_steps, warmup)
        self.params = trainable_params(model)
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
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

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
        from bunny.train.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, loss_module, cfg, dist, total_steps, warmup, accum)
    if kind == "fsdp":
        from bunny.train.engine_fsdp import FSDPEngine

        return FSDPEngine(model, loss_module, cfg, dist, total_steps, warmup)
    raise ValueError(f"unknown distributed mode {kind!r}")

