"""``load_model(path)``: detect a model folder's layout and load it (the top of ``bunny.model``).

| layout                      | recognised by                                   | handled in                         |
|-----------------------------|-------------------------------------------------|------------------------------------|
| ours                        | config.json ``model_type: bunny``               | ``bunny.model.layouts.ours``       |
| LoRA run                    | ``adapter_config.json`` (+ ``bunny_lora.json``) | ``bunny.model.layouts.lora``       |
| original Bunny release      | config.json ``model_type: bunny-*``             | ``bunny.model.layouts.original``   |
| transformers Llava          | config.json ``model_type: llava``               | ``bunny.model.layouts.llava``      |

Every loader returns ``(BunnyForConditionalGeneration, BunnyProcessor)``; the model is in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bunny.model.hub import resolve_folder
from bunny.model.layouts import detect_layout, load_detected
from bunny.model.special_tokens import warn_if_split


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load any supported model folder -> ``(model, processor)`` (model in eval mode).

    ``path`` may also be a hub name (``BAAI/Bunny-v1_0-3B``): downloaded into the HF cache, or read
    from it offline (``HF_HUB_OFFLINE=1``), see ``bunny.model.hub``.

    ``dtype``: torch dtype (or its name); None keeps the checkpoint's. ``device``: where to put the
    model (default CPU). ``trust_remote_code`` is only used for LLMs of the ``generic`` family whose
    folders need it; no loader here runs hub code otherwise.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = resolve_folder(path, what="model")
    model, processor = load_detected(Path(path), dtype, trust_remote_code)
    if device is not None:
        model.to(device)
    model.eval()
    warn_if_split(model, processor, path)  # a folder from before template tokens were added
    return model, processor


__all__ = ["detect_layout", "load_model"]
