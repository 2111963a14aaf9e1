"""Our own layout (config.json ``model_type: bunny``): save it atomically, detect it, load it.

Files: ``config.json``, ``model.safetensors`` (sharded when large), ``generation_config.json``,
tokenizer files, ``preprocessor_config.json`` and ``processor_config.json``. The folder loads with
``bunny.load_model`` or, once ``bunny`` is imported, with ``AutoModelForImageTextToText`` (no
remote code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bunny.model.files import atomic_folder
from bunny.model.layouts.base import LAYOUTS, Layout
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processing import BunnyProcessor


def save_model(model: Any, processor: BunnyProcessor | None, out_dir: str | Path,
               max_shard_size: str | int = "5GB") -> Path:
    """Write the folder (see the module docstring) atomically; returns its path."""
    from peft import PeftModel

    if isinstance(getattr(model, "language_model", None), PeftModel):
        raise ValueError("the language model still has LoRA adapters; merge them first (bunny merge) or "
                         "save the adapter with the training run")
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
    return Path(out_dir)


@LAYOUTS.register("bunny")
class OursLayout(Layout):
    name = "bunny"
    described = "'bunny' (ours)"
    order = 10

    @classmethod
    def detect(cls, folder: Path, config: dict | None) -> bool:
        return config is not None and config.get("model_type") == "bunny"

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[Any, BunnyProcessor]:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = BunnyForConditionalGeneration.from_pretrained(str(folder), **kwargs)
        processor = BunnyProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if (processor.image_token_id, processor.num_image_tokens) != (model.config.image_token_id,
                                                                      model.config.num_image_tokens):
            raise ValueError(
                f"{folder}: processor_config.json (image_token_id {processor.image_token_id}, num_image_tokens "
                f"{processor.num_image_tokens}) disagrees with config.json ({model.config.image_token_id}, "
                f"{model.config.num_image_tokens})"
            )
        return model, processor
