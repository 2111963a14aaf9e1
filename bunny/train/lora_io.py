"""The LoRA run folder: PEFT adapter + the other trained tensors + the base model's path.

Layout (what ``bunny train`` writes in ``final/`` when ``tune: lora``)::

    adapter_config.json, adapter_model.safetensors   PEFT's own files for the language model
    non_lora_trainables.safetensors                  projector (and an unfrozen vision tower), keyed by
                                                     their names in BunnyForConditionalGeneration
    bunny_lora.json                                  {"format": 1, "base_model": "<full model folder>", ...}
    tokenizer files, preprocessor_config.json, processor_config.json

Why not save the whole model: the base is multi-GB and unchanged; the run's own tensors are the
adapter (r=128 on Phi-2: ~190M numbers) and the projector. ``bunny merge`` folds the adapter into the
base and writes a normal model folder; ``bunny.load_model`` opens this folder directly (the loader
is ``bunny.model.layouts.lora``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LORA_META = "bunny_lora.json"
NON_LORA = "non_lora_trainables.safetensors"


def non_lora_state(model: Any) -> dict[str, torch.Tensor]:
    """Trained tensors outside the language model (projector, unfrozen vision tower)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("language_model.")}


def save_lora_run(model: Any, processor: Any, out_dir: str | Path, base_model: str | Path,
                  non_lora: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA folder atomically (``model.language_model`` must be a PEFT model)."""
    from safetensors.torch import save_file

    from bunny.model.files import atomic_folder

    with atomic_folder(out_dir) as tmp:
        model.language_model.save_pretrained(str(tmp))
        save_file(non_lora if non_lora is not None else non_lora_state(model), str(tmp / NON_LORA),
                  metadata={"format": "pt"})
        (tmp / LORA_META).write_text(json.dumps({
            "format": 1,
            "base_model": str(Path(base_model).resolve()),
            "adapter": "adapter_model.safetensors",
            "non_lora": NON_LORA,
        }, indent=2))
        if processor is not None:
            processor.save_pretrained(tmp)
    return Path(out_dir)
