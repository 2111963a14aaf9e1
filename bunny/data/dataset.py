"""Lazy supervised dataset, modality/length-grouped batch plan, padding and padding-free packing.

Three pieces, each small:

- :class:`SupervisedDataset`: sample ``i`` -> token ids and labels (by the chat template, built by
  construction) and its images (decoded and preprocessed on demand, in DataLoader workers), or
  the cached encoder features of its images (stage 1 with a feature cache).
- :class:`BatchPlan`: which samples form each optimizer step. The plan is made of *global*
  batches (``global_batch_size`` samples, the same whatever the number of processes), so a
  2-process run and a 1-process run with the same global batch see the same samples per step; a
  global batch is cut into micro-batches that are dealt to processes and accumulation steps.
  Deterministic in (seed, epoch), so resuming at step k is slicing the plan.
- :class:`Collator`: a micro-batch -> tensors, right-padded, or packed without padding (several
  samples in one row, ``position_ids`` restarting at 0 for each sample, no attention mask: the
  model's mask code then keeps attention inside each sample; see ``transformers.masking_utils``).

Grouping, as in LLaVA/Bunny: with ``group_by_modality`` a global batch holds only image samples or
only text-only samples (the last one of an epoch may mix); with ``group_by_length`` samples are
sorted by length inside windows of ``length_window`` global batches before being cut, so a
micro-batch pads little. Both change which samples share a step, never which samples are seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bunny.data.images import ImageError
from bunny.data.samples import Sample, SampleIssue, resolve_image
from bunny.data.templates import IGNORE_INDEX, ChatTemplate


def count_targets(labels: Sequence[int]) -> int:
    """Supervised next-token targets of one sample: labels after its first token (the first token
    is never predicted, see :class:`Collator`)."""
    return sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)


class SupervisedDataset(torch.utils.data.Dataset):
    """Samples -> ``{"input_ids", "labels", "pixel_values" | "image_features", "index"}`` on demand.

    Nothing is decoded or tokenized up front (beyond what validation measured), so memory does
    not grow with the data set and DataLoader workers do the image work in parallel.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        tokenizer: Any,
        template: ChatTemplate,
        image_token_id: int,
        num_image_tokens: int,
        image_folder: str | Path | None,
        image_processor: Any = None,
        image_mode: str | None = None,
        lengths: Sequence[int] | None = None,
        targets: Sequence[int] | None = None,
        feature_cache: Any = None,
    ) -> None:
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.image_folder = image_folder
        self.image_processor = image_processor
        self.image_mode = image_mode
        self.feature_cache = feature_cache
        self._lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self._targets = None if targets is None else np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    # -- lengths and modality (for the batch plan) ----------------------------------------------
    def encode(self, i: int) -> tuple[list[int], list[int]]:
        s = self.samples[i]
        return self.template.encode(s.conversations, self.tokenizer, self.image_token_id, self.num_image_tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each sample (images expanded)."""
        if self._lengths is None:
            self._measure()
        return self._lengths  # type: ignore[return-value]

    @property
    def targets(self) -> np.ndarray:
        """Supervised next-token targets of each sample (labels after the first token): the loss
        denominator of a step is the sum over its samples, known before any batch is built."""
        if self._targets is None:
            self._measure()
        return self._targets  # type: ignore[return-value]

    def _measure(self) -> None:
        lengths, targets = [], []
        for i in range(len(self)):
            ids, labels = self.encode(i)
            lengths.append(len(ids))
            targets.append(count_targets(labels))
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._targets = np.asarray(targets, dtype=np.int64)

    @property
    def has_image(self) -> np.ndarray:
        return np.array([s.has_image for s in self.samples], dtype=bool)

    def image_key(self, rel: str) -> str:
        """The feature-cache key of an image: its path relative to the image folder."""
        return rel

    def image_path(self, rel: str) -> Path:
        return resolve_image(self.image_folder, rel)

    def load_pixels(self, rel: str) -> torch.Tensor:
        """One image, decoded (guarded) and preprocessed exactly as the processor does at inference."""
        if self.image_processor is None:
            raise ValueError("this dataset was built without an image processor (text-only)")
        return torch.from_numpy(self.image_processor.preprocess_one(self.image_path(rel), mode=self.image_mode))

    # -- one sample -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels = self.encode(i)
        item: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "index": i,
        }
        images = self.samples[i].images
        if images:
            if self.feature_cache is not None:
                item["image_features"] = torch.stack([self.feature_cache.get(self.image_key(r)) for r in images])
            else:
                try:
                    item["pixel_values"] = torch.stack([self.load_pixels(r) for r in images])
                except ImageError as exc:
                    item.update(self._stand_in(i, exc))
        return item

    def _stand_in(self, i: int, exc: ImageError) -> dict[str, Any]:
        """What replaces a sample whose image fails to load during training (it passed validation
        under ``image_check: open/exists/none``): the same tokens with a blank image and no
        targets, so it teaches nothing. Chosen from the sample alone, never from the RNG or the
        other samples, so a resumed or multi-process run replays exactly what an uninterrupted one
        did; the issue travels with the batch for the trainer to log (skip) or stop on (error)."""
        from PIL import Image

        s = self.samples[i]
        blank = torch.from_numpy(self.image_processor.preprocess_one(Image.new("RGB", (64, 64)), mode=self.image_mode))
        issue = SampleIssue(s.source, s.index, "image", f"failed to load during training: {exc}", s.id, s.jsonl)
        return {"labels": torch.full_like(torch.as_tensor(self.encode(i)[1]), IGNORE_INDEX),
                "pixel_values": blank.unsqueeze(0).expand(len(s.images), *blank.shape).clone(), "bad": [issue]}


# ---------------------------------------------------------------------------------------------
# the batch plan


@dataclass
class BatchPlan:
    """Global batches -> this process's micro-batches, per epoch, deterministic and resumable.

    ``micro_batches(epoch)[k]`` is the k-th micro-batch this rank runs in that epoch; optimizer
    step ``s`` of the epoch uses micro-batches ``s*accum .. s*accum+accum-1``. Samples past the
    last full global batch of an epoch are left out of that epoch (the count is in
    ``dropped_per_epoch``); they differ from epoch to epoch because the order is reshuffled.
    """

    lengths: np.ndarray
    has_image: np.ndarray
    micro_batch_size: int
    world_size: int
    accum: int
    seed: int = 0
    group_by_length: bool = True
    group_by_modality: bool = True
    length_window: int = 16

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        self.has_image = np.asarray(self.has_image, dtype=bool)
        if len(self.lengths) != len(self.has_image):
            raise ValueError("lengths and has_image differ in size")
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data set has {len(self.lengths)} sample(s), fewer than one global batch of "
                f"{self.global_batch_size} (micro-batch {self.micro_batch_size} x {self.world_size} process(es) "
                f"x {self.accum} accumulation step(s))"
            )

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.lengths) - self.steps_per_epoch * self.global_batch_size

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (sample indices), the same for every world size."""
        rng = np.random.default_rng([self.seed, epoch])
        g = self.global_batch_size
        n = len(self.lengths)
        groups = [np.flatnonzero(self.has_image), np.flatnonzero(~self.has_image)] if self.group_by_modality \
            else [np.arange(n)]
        full: list[np.ndarray] = []
        leftovers: list[np.ndarray] = []
        for idx in groups:
            if len(idx) == 0:
                continue
            idx = idx[rng.permutation(len(idx))]
            if self.group_by_length:
                window = g * max(1, self.length_window)
                parts = []
                for start in range(0, len(idx), window):
                    chunk = idx[start:start + window]
                    # longest first, ties in shuffled order (stable sort keeps the permutation)
                    parts.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
                idx = np.concatenate(parts)
            n_full = len(idx) // g
            full.extend(idx[k * g:(k + 1) * g] for k in range(n_full))
            leftovers.append(idx[n_full * g:])
        rest = np.concatenate(leftovers) if leftovers else np.zeros(0, dtype=np.int64)
        rest = rest[rng.permutation(len(rest))]
        if self.group_by_length:
            rest = rest[np.argsort(-self.lengths[rest], kind="stable")]
        full.extend(rest[k * g:(k + 1) * g] for k in range(len(rest) // g))
        order = rng.permutation(len(full))
        return [full[k] for k in order][: self.steps_per_epoch]

    def split(self, batch: np.ndarray) -> list[list[list[int]]]:
        """A global batch -> ``[rank][accum step]`` micro-batches.

        Micro-batch ``j`` (in the batch's order, so similar lengths stay together) goes to rank
        ``j % world_size``, accumulation step ``j // world_size``.
        """
        b = self.micro_batch_size
        micro = [batch[j * b:(j + 1) * b].tolist() for j in range(self.world_size * self.accum)]
        return [[micro[a * self.world_size + r] for a in range(self.accum)] for r in range(self.world_size)]

    def micro_batches(self, epoch: int, rank: int, start_step: int = 0) -> list[list[int]]:
        """This rank's micro-batches of the epoch, from optimizer step ``start_step`` on."""
        out: list[list[int]] = []
        for batch in self.global_batches(epoch)[start_step:]:
            out.extend(self.split(batch)[rank])
        return out


# ---------------------------------------------------------------------------------------------
# collation


@dataclass
class Collator:
    """A list of dataset items -> model inputs.

    Padded: rows right-padded to the longest, ``attention_mask`` marks real tokens. Packed: the
    samples are placed one after the other into rows of at most ``pack_length`` tokens (next fit,
    in order), ``position_ids`` restart at 0 for each sample, and no attention mask is returned, so
    attention stays inside each sample; rows are right-padded to the longest row (the padding forms
    its own segment and carries no label). In both cases the label of each sample's first token is
    dropped (it is never a target when the sample stands alone, and packed it would be predicted
    from the previous sample), and ``n_targets`` counts the supervised next-token targets, the
    denominator of the loss: so packed and padded batches give the same loss.
    """

    pad_token_id: int
    pack: bool = False
    pack_length: int | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        seqs = [(it["input_ids"], it["labels"].clone()) for it in items]
        for _, lab in seqs:
            lab[0] = IGNORE_INDEX
        batch = self._packed(seqs) if self.pack else self._padded(seqs)
        batch["n_targets"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch["n_samples"] = len(items)
        batch["n_tokens"] = int(sum(len(ids) for ids, _ in seqs))
        batch["indices"] = [it["index"] for it in items]
        batch["bad"] = [issue for it in items for issue in it.get("bad", ())]
        for key in ("pixel_values", "image_features"):
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        return batch

    def _padded(self, seqs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(seqs):
            input_ids[r, : len(ids)] = ids
            labels[r, : len(ids)] = lab
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def _packed(self, seqs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        cap = self.pack_length or sum(len(ids) for ids, _ in seqs)
        rows: list[list[int]] = []  # sample indices per row, next fit in order (images stay in order)
        used: list[int] = []
        for k, (ids, _) in enumerate(seqs):
            if len(ids) > cap:
                raise ValueError(f"a sample of {len(ids)} tokens does not fit pack_length {cap}")
            # Order matters: image features are consumed in sample order, so a sample may only join
            # the last row (first fit over all rows would reorder images across rows).
            if rows and used[-1] + len(ids) <= cap:
                rows[-1].append(k)
                used[-1] += len(ids)
            else:
                rows.append([k])
                used.append(len(ids))
        width = max(used)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, members in enumerate(rows):
            pos = 0
            for k in members:
                ids, lab = seqs[k]
                n = len(ids)
                input_ids[r, pos:pos + n] = ids
                labels[r, pos:pos + n] = lab
                position_ids[r, pos:pos + n] = torch.arange(n)
                pos += n
            if pos < width:
                position_ids[r, pos:] = torch.arange(width - pos)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": None}
