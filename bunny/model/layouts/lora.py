"""LoRA run folders -> a model: the base, the PEFT adapter (merged), and the trained non-LoRA tensors.

Two layouts, both recognised by ``adapter_config.json``:

* ours (``bunny train`` with ``tune: lora``; written by ``bunny.train.lora_io``)::

      adapter_config.json, adapter_model.safetensors   PEFT adapter of the language model
      non_lora_trainables.safetensors                  projector (+ an unfrozen vision tower), our key names
      bunny_lora.json                                  {"base_model": "<a model folder load_model reads>", ...}
      tokenizer + preprocessor_config.json + processor_config.json

* the original Bunny code's LoRA output: ``config.json`` (``model_type: bunny-*`` with the mm_* fields),
  ``adapter_config.json`` whose ``base_model_name_or_path`` is the LLM folder, ``adapter_model.*`` (keys
  ``base_model.model.model.layers.*`` -- the LLM's own names, so PEFT applies it to our language model
  unchanged), ``non_lora_trainables.bin`` (``base_model.model.model.mm_projector.*``, read with
  ``weights_only=True``), the tokenizer; ``mm_vision_tower`` must be a local folder or a hub name (the
  tower is not in the run folder), as may ``base_model_name_or_path`` (``bunny.model.hub``).

The adapter is merged into the LLM's weights (``merge=False`` keeps the PEFT wrapper, e.g. to continue
training): a merged model runs at the base model's speed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bunny.model.assemble import assemble_model
from bunny.model.files import read_json, read_tensors
from bunny.model.gguf import gguf_to_folder, is_gguf
from bunny.model.hub import resolve_folder
from bunny.model.layouts.base import LAYOUTS, Layout, load_detected
from bunny.model.layouts.original import RELEASE_TYPES
from bunny.model.layouts.weights import rename_keys
from bunny.model.processing import BunnyProcessor

LORA_META = "bunny_lora.json"
NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
#: original non-LoRA key prefixes -> ours
ORIGINAL_NON_LORA = [
    (r"^(?:base_model\.model\.)?model\.mm_projector\.", "mm_projector."),
    (r"^(?:base_model\.model\.)?model\.vision_tower\.vision_tower\.(?:vision_model\.|model\.(?:visual\.)?)?",
     "vision_tower.vision_tower."),
]


@LAYOUTS.register("lora")
class LoraLayout(Layout):
    name = "lora"
    described = "a LoRA run folder with adapter_config.json"
    order = 0  # before the others: an original LoRA run also has a bunny-* config.json

    @classmethod
    def detect(cls, folder: Path, config: dict | None) -> bool:
        return (folder / "adapter_config.json").is_file()

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[Any, Any]:
        return load_lora_model(folder, dtype=dtype, trust_remote_code=trust_remote_code)


def load_lora_model(path: Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                    merge: bool = True) -> tuple[Any, Any]:
    """``(model, processor)`` from a LoRA folder of either layout (see the module docstring)."""
    if (path / LORA_META).is_file():
        return _load_ours(path, dtype, trust_remote_code, merge)
    if (path / "config.json").is_file() and str(read_json(path / "config.json").get("model_type", "")).startswith("bunny-"):
        return _load_original(path, dtype, trust_remote_code, merge)
    raise FileNotFoundError(
        f"{path}: has adapter_config.json but neither {LORA_META} (a bunny train LoRA run) nor a config.json of "
        "model_type bunny-* (an original Bunny LoRA run); cannot tell which model the adapter belongs to")


def _load_ours(path: Path, dtype, trust_remote_code: bool, merge: bool) -> tuple[Any, Any]:
    meta_file = path / LORA_META
    meta = read_json(meta_file)
    if "base_model" not in meta:
        raise ValueError(f"{meta_file}: missing field 'base_model'")
    base = Path(meta["base_model"])
    if not base.is_absolute():
        base = (path / base).resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"{meta_file}: base_model {base} does not exist (moved?); edit the path in the file")
    model, base_processor = load_detected(base, dtype=dtype, trust_remote_code=trust_remote_code)
    _apply_adapter(model, path, merge)
    non_lora = path / meta.get("non_lora", NON_LORA_FILES[0])
    if non_lora.is_file():
        _copy_into(model, read_tensors(non_lora), source=str(non_lora))
    processor = BunnyProcessor.from_pretrained(path, trust_remote_code=trust_remote_code) \
        if (path / "processor_config.json").is_file() else base_processor
    # The run's processor is the truth for how prompts were built (a stage-2 run may change the template).
    model.config.image_aspect_ratio = processor.image_processor.image_aspect_ratio
    if getattr(processor, "chat_template", None):
        model.config.chat_template = processor.chat_template
    return model, processor


def _load_original(path: Path, dtype, trust_remote_code: bool, merge: bool) -> tuple[Any, Any]:
    """Assemble the base from the adapter's LLM folder + ``mm_vision_tower``, then projector + adapter."""
    raw = read_json(path / "config.json")
    adapter_cfg = read_json(path / "adapter_config.json")
    llm = resolve_folder(adapter_cfg.get("base_model_name_or_path") or "", what="base_model_name_or_path")
    if is_gguf(llm):
        llm = gguf_to_folder(llm)
    if not llm.is_dir():
        raise FileNotFoundError(f"{path / 'adapter_config.json'}: base_model_name_or_path {str(llm)!r} is not a local "
                                "LLM folder; set it to the folder of the base LLM")
    tower = resolve_folder(raw.get("mm_vision_tower", ""), what="mm_vision_tower")
    if not tower.exists():
        raise FileNotFoundError(f"{path / 'config.json'}: mm_vision_tower {str(tower)!r} is not a local folder; "
                                "set it to the vision checkpoint the run used")
    _, family, template = RELEASE_TYPES.get(raw.get("model_type"), (None, None, None))
    s2 = [int(s) for s in str(raw.get("s2_scales") or "384,768,1152").split(",")] if raw.get("use_s2") else None
    model, processor = assemble_model(
        tower, llm, projector_type=raw.get("mm_projector_type", "mlp2x_gelu"), llm_family=family, s2_scales=s2,
        chat_template=template,
        image_aspect_ratio=raw.get("image_aspect_ratio") or "pad", dtype=dtype, trust_remote_code=trust_remote_code,
        tokenizer_path=path if (path / "tokenizer_config.json").is_file() else None)
    non_lora = next((path / n for n in NON_LORA_FILES if (path / n).is_file()), None)
    if non_lora is None:
        raise FileNotFoundError(f"{path}: no {' or '.join(NON_LORA_FILES)} (the trained projector)")
    state, origin = rename_keys(read_tensors(non_lora), ORIGINAL_NON_LORA)
    _copy_into(model, state, source=str(non_lora), origin=origin)
    _apply_adapter(model, path, merge)
    return model, processor


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrap calls that build a PEFT model (``get_peft_model``, ``PeftModel.from_pretrained``).

    Why: peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated in favour of
    ``is_activation_checkpointing``; every LoRA load and every LoRA run then printed a FutureWarning
    that the user can do nothing about. Only that one warning is silenced, only inside the call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _apply_adapter(model: Any, path: Path, merge: bool) -> None:
    from peft import PeftModel

    with quiet_peft():
        model.language_model = PeftModel.from_pretrained(model.language_model, str(path))
    if merge:
        model.language_model = model.language_model.merge_and_unload()


def _copy_into(model: Any, state: dict[str, torch.Tensor], source: str, origin: dict[str, str] | None = None) -> None:
    """Copy trained tensors over the model's; every key must name a parameter of the same shape."""
    own = dict(model.named_parameters())
    origin = origin or {}
    unexpected = sorted(origin.get(k, k) for k in state if k not in own)
    wrong = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and v.shape != own[k].shape)
    if unexpected or wrong:
        raise ValueError(f"{source}: tensors do not fit the base model; no such parameter: {unexpected[:10]}; "
                         f"shape mismatch: {wrong[:10]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


__all__ = ["LORA_META", "LoraLayout", "load_lora_model", "quiet_peft"]
