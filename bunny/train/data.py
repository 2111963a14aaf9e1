"""The run's data: read, validate (once, on the main process), measure, and build the dataset.

Validation runs before any training step and reports every problem at once (see
``bunny.data.samples``); its length check uses the run's own chat template and tokenizer, so "too
long" means too long for this model. The main process does the work and sends the outcome (the
kept samples' positions, token lengths and target counts, or the error) to the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from bunny.data.dataset import SupervisedDataset, count_targets
from bunny.data.samples import DataValidationError, Sample, apply_policy, read_samples, validate
from bunny.data.templates import ChatTemplate
from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo

log = logging.getLogger(__name__)


def read_raw(cfg: TrainConfig) -> tuple[list[Sample], list]:
    samples, read_issues = read_samples(cfg.data_path or [])
    if cfg.max_samples is not None:
        samples = samples[: cfg.max_samples]
    return samples, read_issues


def data_fingerprint(cfg: TrainConfig, samples: list[Sample], read_issues: list, n_kept: int) -> dict[str, Any]:
    """What the run trains on, cheaply (no file is read again, whatever its size): each data file's
    name and size, the records read and the samples kept after validation. A resume compares it with
    the checkpoint's so it never continues at step k on data that shifted under it."""
    files = [[str(p), Path(p).stat().st_size] for p in cfg.data_path or []]
    return {"files": files, "samples_read": len(samples) + len({i.key for i in read_issues}), "samples_kept": n_kept}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same data)."""
    changes = []
    old_files, new_files = dict(map(tuple, old.get("files", []))), dict(map(tuple, new.get("files", [])))
    for name in sorted(set(old_files) | set(new_files)):
        a, b = old_files.get(name), new_files.get(name)
        if a != b:
            changes.append(f"{name}: " + ("added" if a is None else "removed" if b is None else f"{a} -> {b} bytes"))
    for key in ("samples_read", "samples_kept"):
        if old.get(key) != new.get(key):
            changes.append(f"{key.replace('_', ' ')}: {old.get(key)} -> {new.get(key)}")
    return changes


def texts_of(samples: list[Sample]) -> list[str]:
    """Every text of the data (for training a tiny run's tokenizer)."""
    return [t.get("value", "") for s in samples for t in s.conversations
            if isinstance(t, dict) and isinstance(t.get("value"), str)]


def build_dataset(
    cfg: TrainConfig,
    samples: list[Sample],
    read_issues: list,
    *,
    processor: Any,
    template: ChatTemplate,
    dist: DistInfo,
) -> SupervisedDataset:
    tok = processor.tokenizer
    image_token_id, n_image = processor.image_token_id, processor.num_image_tokens
    payload: dict[str, Any]
    if dist.is_main:
        targets: dict[tuple[str, int], int] = {}

        def length_fn(s: Sample) -> int:
            ids, labels = template.encode(s.conversations, tok, image_token_id, n_image)
            targets[(s.source, s.index)] = count_targets(labels)
            return len(ids)

        report = validate(samples, image_folder=cfg.image_folder, image_check=cfg.image_check, length_fn=length_fn,
                          max_length=cfg.model_max_length, read_issues=read_issues,
                          allow_outside_folder=cfg.allow_images_outside_folder)
        try:
            kept = apply_policy(report, cfg.on_bad_sample)
            position = {(s.source, s.index): k for k, s in enumerate(samples)}
            payload = {
                "kept": [position[(s.source, s.index)] for s in kept],
                "lengths": report.lengths,
                "targets": [targets[(s.source, s.index)] for s in kept],
                "skipped": report.n_bad,
            }
        except DataValidationError as exc:
            payload = {"error": str(exc), "issues": exc.issues, "n": report.n_read}
    else:
        payload = {}
    payload = dist.broadcast_object(payload)
    if "error" in payload:
        raise DataValidationError(payload["issues"], payload["n"])
    kept_samples = [samples[k] for k in payload["kept"]]
    if not kept_samples:
        raise ValueError(f"no sample to train on in {[str(p) for p in cfg.data_path or []]} "
                         f"({len(samples)} read, {payload['skipped']} skipped)")
    image_mode = cfg.image_aspect_ratio or processor.image_processor.image_aspect_ratio
    return SupervisedDataset(
        kept_samples,
        tokenizer=tok,
        template=template,
        image_token_id=image_token_id,
        num_image_tokens=n_image,
        image_folder=cfg.image_folder,
        image_processor=processor.image_processor,
        image_mode=image_mode,
        lengths=np.asarray(payload["lengths"], dtype=np.int64),
        targets=np.asarray(payload["targets"], dtype=np.int64),
    )
