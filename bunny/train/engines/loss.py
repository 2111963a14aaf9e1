"""The micro-batch loss every engine wraps: model forward (or projector over cached features) under
autocast, plus the blank image row that keeps processes in step.

Loss scaling: the loss of a micro-batch is ``sum of its token losses / targets in the whole global
batch`` (all micro-batches, all processes), so the *sum* of the micro-batch gradients over all
processes is the gradient of the global mean. DDP, DeepSpeed and FSDP average gradients over
processes (and DeepSpeed also over accumulation steps), so each engine's ``backward`` multiplies by
what it divides by. This is what makes a 2-process run equal a 1-process run with the same global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from bunny.data.templates import IGNORE_INDEX as IGNORE


class LossModule(nn.Module):
    """``BunnyForConditionalGeneration`` + the step's inputs -> the micro-batch loss.

    A module of its own so DDP/DeepSpeed/FSDP wrap one forward that includes the projector over
    cached features (stage 1 with a feature cache) and the autocast region.
    """

    def __init__(self, model: nn.Module, supervised_only: bool, autocast_dtype: torch.dtype | None,
                 device: torch.device, blank_images: str = "none", loss_chunk_size: int | None = None):
        super().__init__()
        if blank_images not in ("none", "projector", "tower"):
            raise ValueError(f"blank_images must be none, projector or tower, got {blank_images!r}")
        self.model = model
        self.supervised_only = supervised_only
        self.autocast_dtype = autocast_dtype
        self.device_type = device.type
        self.blank_images = blank_images
        self.loss_chunk_size = loss_chunk_size

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
                loss_chunk_size=self.loss_chunk_size,
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
