"""The model a run starts from: a bunny folder, a stage-1 run, backbones assembled from parts, or
random tiny backbones, plus the projector of a stage-1 run.

| config                                        | start model                                   |
|-----------------------------------------------|-----------------------------------------------|
| ``model_name_or_path: DIR``                   | ``load_model(DIR)``                           |
| ``projector_from: RUN`` alone                 | the stage-1 run's ``final/`` model folder     |
| ``vision_tower`` + ``language_model``         | ``assemble_model`` (new projector)            |
| ``tiny: {...}``                               | ``bunny.model.tiny.tiny_model`` (seeded)      |

With backbones named, ``projector_from`` (a run, a model folder or an ``mm_projector.safetensors``)
only supplies the projector weights. Everything here is deterministic, which exact resume relies
on: a resumed run rebuilds the same start model and then loads the trained tensors over it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bunny.model import attention
from bunny.train.config import TrainConfig

log = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"


def model_folder_of(path: Path) -> Path | None:
    """The model folder inside a run folder (``final/``), or ``path`` itself when it is one."""
    for cand in (path / "final", path):
        if (cand / "config.json").is_file() or (cand / "adapter_config.json").is_file():
            return cand
    return None


def projector_state(path: Path) -> dict[str, torch.Tensor]:
    """Projector weights (keys relative to ``mm_projector``) from a file, a run or a model folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        state = load_file(str(path))
    elif (path / PROJECTOR_FILE).is_file():
        state = load_file(str(path / PROJECTOR_FILE))
    else:
        folder = model_folder_of(path)
        if folder is None:
            raise FileNotFoundError(f"projector_from: {path} has no {PROJECTOR_FILE} and no model folder")
        from bunny.model.files import read_state_dict

        state = read_state_dict(folder)
    if any(k.startswith("mm_projector.") for k in state):
        state = {k[len("mm_projector."):]: v for k, v in state.items() if k.startswith("mm_projector.")}
    if not state:
        raise ValueError(f"projector_from: no projector weights found in {path}")
    return state


def load_projector(model: Any, path: Path) -> None:
    state = projector_state(path)
    own = model.mm_projector.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(
            f"projector_from {path}: its weights ({sorted((k, tuple(v.shape)) for k, v in state.items())}) do not fit "
            f"this model's {model.config.projector_type} projector "
            f"({sorted((k, tuple(v.shape)) for k, v in own.items())})"
        )
    model.mm_projector.load_state_dict(state)


def tiny_tokenizer(cfg: TrainConfig, texts: list[str], main: bool, barrier) -> Any:
    """The tiny run's tokenizer: a folder, or a byte-level BPE trained on the data (once, on the main
    process, saved in ``output_dir/tokenizer`` so every process and every resume reads the same)."""
    from transformers import AutoTokenizer

    assert cfg.tiny is not None
    if cfg.tiny.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.tiny.tokenizer)
    folder = Path(cfg.output_dir) / "tokenizer"
    if main and not (folder / "tokenizer.json").is_file():
        from bunny.backbones.tokenizer import save, train_tokenizer

        tmp = folder.with_name(".tokenizer.tmp")
        save(train_tokenizer(texts, vocab_size=cfg.tiny.vocab_size), tmp, model_max_length=cfg.model_max_length)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
    barrier()
    return AutoTokenizer.from_pretrained(str(folder))


def _add_template_tokens(cfg: TrainConfig, model: Any, processor: Any, base: Path | None) -> None:
    """The special strings of the run's template and the model's chat template as single tokens.

    Models built here already have them (``tiny_model`` / ``assemble_model`` add them); a loaded folder
    or a changed template may not. A full or projector-only run adds them (new rows, saved with the
    model). A LoRA run cannot: it saves only the adapter and refers to the base folder, whose
    embeddings and tokenizer lack the new ids."""
    from bunny.model.special_tokens import add_template_tokens, split_template_tokens

    names = list(dict.fromkeys(n for n in (cfg.template, model.config.chat_template) if n))
    if cfg.tune == "lora" and base is not None:
        split = [s for n in names for s in split_template_tokens(processor.tokenizer, n)]
        if split:
            raise ValueError(
                f"template tokens {sorted(set(split))} are not single tokens of the tokenizer of {base}; a LoRA run "
                "keeps the base folder's embeddings and cannot add them. Rebuild the base with the current bunny "
                "(stage 1 adds them) or train this stage with tune: full")
        return
    added = add_template_tokens(model, processor, names)
    if added:
        log.info("added %s to the tokenizer as special tokens (templates %s); embeddings now %d rows",
                 added, names, model.language_model.get_input_embeddings().weight.shape[0])


def build_start_model(cfg: TrainConfig, texts_fn, main: bool = True, barrier=lambda: None
                      ) -> tuple[Any, Any, Path | None]:
    """``(model, processor, base_folder)``; ``base_folder`` is the folder the model was loaded from
    (a LoRA run refers to it; the run's own processor files carry a changed template or image mode),
    or None when the start model exists only in memory."""
    from bunny.model.loading import load_model

    base: Path | None = None
    if cfg.model_name_or_path is not None:
        from bunny.model.hub import resolve_folder

        base = resolve_folder(str(cfg.model_name_or_path), what="model").resolve()  # a hub name: the HF cache
        model, processor = load_model(base, trust_remote_code=cfg.trust_remote_code)
    elif cfg.tiny is None and not (cfg.vision_tower and cfg.language_model):
        assert cfg.projector_from is not None  # check_paths guarantees one of the four
        folder = model_folder_of(Path(cfg.projector_from))
        if folder is None or not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"projector_from: {cfg.projector_from} holds no full model folder (final/config.json); name the "
                "backbones (vision_tower + language_model, or tiny) to use only its projector"
            )
        base = folder.resolve()
        model, processor = load_model(base, trust_remote_code=cfg.trust_remote_code)
    elif cfg.tiny is not None:
        from bunny.model.tiny import tiny_model

        tok = tiny_tokenizer(cfg, texts_fn(), main, barrier)
        t = cfg.tiny
        extra = {"vision_feature_layer": cfg.vision_feature_layer}
        model, processor = tiny_model(
            tok, vision=t.vision_encoder, family=t.llm_family, projector_type=cfg.projector_type,
            s2_scales=cfg.s2_scales, seed=t.seed, vision_overrides=t.vision, text_overrides=t.text, **extra)
    else:
        from bunny.model.assemble import assemble_model

        kwargs: dict[str, Any] = {"projector_type": cfg.projector_type}
        for key in ("llm_family", "vision_encoder", "s2_scales"):
            if getattr(cfg, key) is not None:
                kwargs[key] = getattr(cfg, key)
        if cfg.stage == "finetune" and cfg.template:
            kwargs["chat_template"] = cfg.template  # stage 1's plain is for training only
        model, processor = assemble_model(
            cfg.vision_tower, cfg.language_model, vision_feature_layer=cfg.vision_feature_layer,
            trust_remote_code=cfg.trust_remote_code, seed=cfg.seed, **kwargs)  # seeded: resume rebuilds it
    if cfg.projector_from is not None and (cfg.tiny is not None or (cfg.vision_tower and cfg.language_model)):
        load_projector(model, Path(cfg.projector_from))
        base = None
    elif base is None and cfg.projector_init == "zero_out":
        from bunny.model.projectors import zero_output_layer

        zero_output_layer(model.mm_projector)  # a resumed run then loads its own projector over it
    if cfg.attn_implementation:
        if cfg.attn_implementation == attention.NAME:
            attention.register()
        model.set_attn_implementation(cfg.attn_implementation)
    else:  # the default: SDPA, with the CPU kernel chosen by length (bunny/model/attention.py says why)
        attention.use_length_dispatch(model.language_model)
    if cfg.stage == "finetune" and cfg.template and model.config.chat_template != cfg.template:
        # the fine-tuned model is prompted at inference with the template it was trained on
        model.config.chat_template = cfg.template
        processor.chat_template = cfg.template
    _add_template_tokens(cfg, model, processor, base)
    if cfg.stage == "finetune" and cfg.image_aspect_ratio and model.config.image_aspect_ratio != cfg.image_aspect_ratio:
        # the fine-tuned model is evaluated and served the way it was trained
        model.config.image_aspect_ratio = cfg.image_aspect_ratio
        processor.image_processor.image_aspect_ratio = cfg.image_aspect_ratio
    model.train()
    return model, processor, base
