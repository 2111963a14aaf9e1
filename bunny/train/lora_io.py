"""The LoRA run folder: PEFT adapter + the other trained tensors + the base model's path.

Layout (what ``bunny train`` writes in ``final/`` when ``tune: lora``)::

    adapter_config.json, adapter_model.safetensors   PEFT's own files for the language model
    non_lora_trainables.safetensors                  projector (and an unfrozen vision tower), keyed by
                                                     their names in BunnyForConditionalGeneration
    bunny_lora.json                                  {"format": 1, "base_model": "<full model folder>", ...}
    tokenizer files, preprocessor_config.json, processor_config.json

Why not save the whole model: the base is multi-GB and unchanged; the run's own tensors are the
adapter (r=128 on Phi-2: ~190M numbers) and the projector. ``bunny merge`` folds the adapter into the
base and writes a normal model folder; ``bunny.load_model`` opens this folder directly.
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

    from bunny.model.checkpoints import atomic_folder

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


def load_lora_run(folder: str | Path, merge: bool = True, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` from a LoRA folder: the base, the adapter (merged when ``merge``), and
    the other trained tensors."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from bunny.model.checkpoints import load_model
    from bunny.model.processing import BunnyProcessor

    folder = Path(folder)
    meta_file = folder / LORA_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder}: no {LORA_META}; not a LoRA run folder written by bunny train")
    meta = json.loads(meta_file.read_text())
    base = Path(meta["base_model"])
    if not base.is_dir():
        raise FileNotFoundError(f"{meta_file}: base_model {base} does not exist (moved?); edit the path in the file")
    model, _ = load_model(base, dtype=dtype)
    model.language_model = PeftModel.from_pretrained(model.language_model, str(folder))
    extra = load_file(str(folder / meta.get("non_lora", NON_LORA)))
    own = dict(model.named_parameters())
    unexpected = sorted(set(extra) - set(own))
    if unexpected:
        raise ValueError(f"{folder / NON_LORA}: tensors {unexpected[:5]} are not parameters of the base model")
    with torch.no_grad():
        for n, t in extra.items():
            own[n].copy_(t.to(own[n].dtype))
    if merge:
        model.language_model = model.language_model.merge_and_unload()
    processor = BunnyProcessor.from_pretrained(folder) if (folder / "processor_config.json").is_file() else \
        BunnyProcessor.from_pretrained(base)
    model.config.image_aspect_ratio = processor.image_processor.image_aspect_ratio
    model.eval()
    return model, processor
