"""Model folders: save ours atomically, load every layout users have.

``load_model(path)`` recognises the folder by its files:

| layout                      | recognised by                                   | handled in                 |
|-----------------------------|-------------------------------------------------|----------------------------|
| ours                        | config.json ``model_type: bunny``               | this module                |
| LoRA run                    | ``adapter_config.json`` (+ ``bunny_lora.json``) | ``bunny.model.lora``       |
| original Bunny release      | config.json ``model_type: bunny-*``             | ``bunny.model.original``   |
| transformers Llava          | config.json ``model_type: llava``               | ``bunny.model.llava``      |

Every loader returns ``(BunnyForConditionalGeneration, BunnyProcessor)``; the model is in eval mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bunny.model.processing import BunnyImageProcessor, BunnyProcessor
from bunny.model.vision import VISION_ENCODERS, read_json


def default_image_processor(config: Any, vision_path: str | Path | None = None) -> BunnyImageProcessor:
    """The image processor for a ``BunnyConfig``: mean/std from the vision folder's
    preprocessor_config.json when given (else the encoder's defaults), size = the model's input size
    (the largest S^2 scale), mode = ``config.image_aspect_ratio``."""
    encoder_cls = VISION_ENCODERS.get(config.vision_encoder)
    stats = encoder_cls.image_processor_config(vision_path, config.vision_config)
    return BunnyImageProcessor(size=config.image_size, image_mean=stats["image_mean"], image_std=stats["image_std"],
                               image_aspect_ratio=config.image_aspect_ratio)


def configure_generation(model: Any, processor: BunnyProcessor) -> None:
    """Set the generation config's end ids (the chat template's end token + the tokenizer's eos) and
    pad id, so ``model.generate`` stops where the template's turns end."""
    from bunny.data.templates import get_template

    tok = processor.tokenizer
    ids: list[int] = []
    if model.config.chat_template:
        ids += get_template(model.config.chat_template).end_token_ids(tok)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(int(tok.eos_token_id))
    gen = model.generation_config
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tok.pad_token_id is not None:
        gen.pad_token_id = int(tok.pad_token_id)
    if tok.bos_token_id is not None:
        gen.bos_token_id = int(tok.bos_token_id)


# -- saving -------------------------------------------------------------------------------------------
def atomic_folder(out_dir: str | Path):
    """Context manager: yields a temporary folder beside ``out_dir`` that replaces it on success.

    Why: a crash (or Ctrl-C) mid-save must never leave a half-written model folder that a later
    ``load_model`` would trust; the rename is atomic on POSIX, the old folder is removed only after.
    """
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return _ctx()


def save_model(model: Any, processor: BunnyProcessor | None, out_dir: str | Path,
               max_shard_size: str | int = "5GB") -> Path:
    """Write ``config.json``, ``model.safetensors`` (sharded when large), ``generation_config.json``,
    tokenizer files, ``preprocessor_config.json`` and ``processor_config.json``, atomically.

    The folder loads with ``bunny.load_model`` or, once ``bunny`` is imported, with
    ``AutoModelForImageTextToText.from_pretrained`` (no remote code)."""
    from peft import PeftModel

    if isinstance(getattr(model, "language_model", None), PeftModel):
        raise ValueError("the language model still has LoRA adapters; merge them first (bunny merge) or "
                         "save the adapter with the training run")
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
    return Path(out_dir)


# -- loading ------------------------------------------------------------------------------------------
def detect_layout(path: str | Path) -> str:
    """``bunny`` | ``lora`` | ``bunny-original`` | ``llava``; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (expected a model folder with config.json)")
    if (path / "adapter_config.json").is_file():
        return "lora"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (and no adapter_config.json): not a model folder")
    model_type = read_json(path / "config.json").get("model_type")
    if model_type == "bunny":
        return "bunny"
    if isinstance(model_type, str) and model_type.startswith("bunny-"):
        return "bunny-original"
    if model_type == "llava":
        return "llava"
    raise ValueError(
        f"{path / 'config.json'}: model_type {model_type!r} is not a Bunny model; known layouts: 'bunny' (ours), "
        "'bunny-*' (original Bunny releases), 'llava' (transformers LlavaForConditionalGeneration), or a LoRA "
        "run folder with adapter_config.json"
    )


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, BunnyProcessor]:
    """Load any supported model folder -> ``(model, processor)`` (model in eval mode).

    ``dtype``: torch dtype (or its name); None keeps the checkpoint's. ``device``: where to put the
    model (default CPU). ``trust_remote_code`` is only used for LLMs of the ``generic`` family whose
    folders need it; no loader here runs hub code otherwise.
    """
    import bunny.model  # noqa: F401  (Auto-class registration)

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    layout = detect_layout(path)
    if layout == "bunny":
        model, processor = _load_ours(Path(path), dtype, trust_remote_code)
    elif layout == "lora":
        from bunny.model.lora import load_lora_model

        model, processor = load_lora_model(Path(path), dtype=dtype, trust_remote_code=trust_remote_code)
    elif layout == "bunny-original":
        from bunny.model.original import load_original_bunny

        model, processor = load_original_bunny(Path(path), dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        from bunny.model.llava import load_llava_folder

        model, processor = load_llava_folder(Path(path), dtype=dtype)
    if device is not None:
        model.to(device)
    model.eval()
    from bunny.model.special_tokens import warn_if_split

    warn_if_split(model, processor, path)  # a folder from before template tokens were added
    return model, processor


def _load_ours(path: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[Any, BunnyProcessor]:
    from bunny.model.modeling import BunnyForConditionalGeneration

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = BunnyForConditionalGeneration.from_pretrained(str(path), **kwargs)
    processor = BunnyProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if (processor.image_token_id, processor.num_image_tokens) != (model.config.image_token_id,
                                                                  model.config.num_image_tokens):
        raise ValueError(
            f"{path}: processor_config.json (image_token_id {processor.image_token_id}, num_image_tokens "
            f"{processor.num_image_tokens}) disagrees with config.json ({model.config.image_token_id}, "
            f"{model.config.num_image_tokens})"
        )
    return model, processor
