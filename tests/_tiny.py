"""Factories for tiny random Bunny models + processors in tests (nothing downloaded, < 1 s each).

    from _tiny import tiny_model, tiny_model_folder, tiny_images   # tests/ is on sys.path under pytest
    model, processor = tiny_model(vision="clip", family="phi-3")
    path = tiny_model_folder(tmp_path, vision="siglip", family="qwen2")   # a saved folder
    model, processor = bunny.load_model(path)

``tokenizer``: ``"bytelevel"`` (a small trained GPT-2-style BPE, no BOS), ``"metaspace"`` (a
SentencePiece-style BPE whose post-processor adds ``<s>``, like Llama/MiniCPM), ``"qwen"`` (Qwen's
real 151k BPE: slower, larger embeddings) or a tokenizer object holding an ``<image>`` token.
Default: ``metaspace`` for ``minicpm``, ``bytelevel`` for every other family.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bunny.model.layouts.ours import save_model
from bunny.model.tiny import tiny_model as _tiny_model

try:  # pytest puts tests/ on sys.path (tests import ``_tiny``); scripts may import ``tests._tiny``
    from _tokenizers import qwen_fast, trained_bpe
except ImportError:  # pragma: no cover
    from tests._tokenizers import qwen_fast, trained_bpe

VISIONS = ("siglip", "clip", "eva_clip")
FAMILIES = ("phi-1.5", "phi-2", "phi-3", "stablelm-2", "qwen1.5", "qwen2", "minicpm", "llama-3", "smollm2",
            "generic")


@functools.lru_cache(maxsize=1)
def _shared_qwen():
    return qwen_fast()


def tiny_tokenizer(kind: str = "bytelevel"):
    """A tokenizer: a fresh object for the small trained BPEs (cheap), ONE shared object for
    ``"qwen"`` (building it takes seconds): restore anything you change on it (``padding_side``)."""
    if kind == "qwen":
        return _shared_qwen()
    return trained_bpe(kind)


def tiny_model(vision: str = "siglip", family: str = "qwen2", tokenizer: Any = None, **overrides: Any):
    """``(model, processor)``: random tiny weights (seeded, ``seed=`` to change), eval mode.

    ``overrides`` go to ``bunny.model.tiny.tiny_model``: ``projector_type``, ``s2_scales``
    (e.g. ``[28, 56]``), ``image_aspect_ratio``, ``seed``, ``dtype``, ``vision_overrides``,
    ``text_overrides``, or any ``BunnyConfig`` field.
    """
    if tokenizer is None:
        tokenizer = "metaspace" if family == "minicpm" else "bytelevel"
    if isinstance(tokenizer, str):
        tokenizer = tiny_tokenizer(tokenizer)
    return _tiny_model(tokenizer, vision=vision, family=family, **overrides)


def tiny_model_folder(tmp_path: str | Path, vision: str = "siglip", family: str = "qwen2", name: str = "model",
                      **kwargs: Any) -> Path:
    """Save a tiny model + processor to ``tmp_path / name`` (our layout) and return the folder."""
    model, processor = tiny_model(vision=vision, family=family, **kwargs)
    return save_model(model, processor, Path(tmp_path) / name)


def tiny_images(n: int = 1, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Image.Image]:
    """``n`` random RGB images (non-square by default, so ``pad`` and ``square`` differ)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
