"""Assembly from parts: a vision checkpoint + an LLM checkpoint -> a fresh Bunny with a new projector.

This is how stage 1 starts (``bunny train`` with ``vision_tower`` and ``language_model``): both
backbones keep their pretrained weights, only the projector is new. Any local HF folder works:

* vision: a ``SiglipModel``/``SiglipVisionModel`` or ``CLIPModel``/``CLIPVisionModel`` folder
  (transformers 4.x or 5 key names), or an EVA02-CLIP checkpoint file/folder (``visual.*``);
  its ``preprocessor_config.json`` gives the image mean/std;
* LLM: any causal-LM folder of a registered family (or ``generic``), with its tokenizer, or a
  ``.gguf`` file (``bunny.model.gguf``: converted once to such a folder);

Either may be a hub name (``google/siglip-so400m-patch14-384``, ``microsoft/phi-2``): resolved
through ``huggingface_hub`` (``bunny.model.hub``: the HF cache offline, a download online).

The tokenizer gets an ``<image>`` special token when it has none; its id is ``image_token_id``.
The embedding matrix is not resized for it: image positions are never looked up (the model writes
image features there), so an id at or beyond the LLM's vocabulary is fine for Bunny itself; export to
transformers' Llava adds the row it needs then. The chat template's special strings (end token, role
markers) that the tokenizer lacks are added too, and those do get (mean-initialised) embedding rows:
the model reads and writes them (``bunny.model.special_tokens``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from bunny.model.finish import finish_model
from bunny.model.gguf import gguf_to_folder, is_gguf
from bunny.model.hub import resolve_folder
from bunny.model.language import LLM_FAMILIES, family_for_config, load_text_config
from bunny.model.modeling import BunnyConfig, BunnyForConditionalGeneration
from bunny.model.processing import BunnyProcessor
from bunny.model.special_tokens import add_image_token
from bunny.model.vision import VISION_ENCODERS, S2Wrapper, detect_vision_encoder


def assemble_model(
    vision_path: str | Path,
    llm_path: str | Path,
    projector_type: str = "mlp2x_gelu",
    llm_family: str | None = None,
    vision_encoder: str | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select: str | None = None,
    s2_scales: list[int] | None = None,
    image_aspect_ratio: str = "pad",
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    tokenizer_path: str | Path | None = None,
    seed: int | None = None,
) -> tuple[Any, BunnyProcessor]:
    """Build ``(model, processor)`` from a vision checkpoint and an LLM folder; the projector is new
    (seeded with ``seed`` when given). Names left None are inferred (encoder from the vision config's
    model_type, family from the LLM config's, template from the family)."""
    vision_path = resolve_folder(vision_path, what="vision tower")  # hub names: the HF cache / a download
    llm_path = resolve_folder(llm_path, what="language model")
    if is_gguf(llm_path):  # a .gguf file: converted once to an HF folder (cached by its hash)
        llm_path = gguf_to_folder(llm_path)
    if tokenizer_path is not None:
        tokenizer_path = resolve_folder(tokenizer_path, what="tokenizer")
    vision_encoder = vision_encoder or detect_vision_encoder(vision_path)
    encoder_cls = VISION_ENCODERS.get(vision_encoder)
    select = vision_feature_select or encoder_cls.default_feature_select
    encoder = encoder_cls.from_pretrained(vision_path, feature_layer=vision_feature_layer, feature_select=select,
                                          dtype=dtype)
    if s2_scales:
        encoder = S2Wrapper(encoder, list(s2_scales))

    text_config = load_text_config(llm_path, trust_remote_code=trust_remote_code)
    family_name = llm_family or family_for_config(text_config)
    family = LLM_FAMILIES.get(family_name)
    family.check_config(text_config)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or llm_path), trust_remote_code=trust_remote_code)
    image_token_id = add_image_token(tokenizer)

    language_model = family.from_pretrained(llm_path, dtype=dtype, trust_remote_code=trust_remote_code)
    config = BunnyConfig(
        vision_config=encoder.config,
        text_config=language_model.config,
        vision_encoder=vision_encoder,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=select,
        s2_scales=list(s2_scales) if s2_scales else None,
        projector_type=projector_type,
        image_aspect_ratio=image_aspect_ratio,
        image_token_id=image_token_id,
        llm_family=family_name,
        chat_template=chat_template,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = BunnyForConditionalGeneration(config, language_model=language_model, vision_tower=encoder)
    # the towers were built before the model: give every part the attention backend the model chose
    model.set_attn_implementation(config._attn_implementation or "sdpa")
    if dtype is not None:
        model.mm_projector.to(dtype)
    # the template's end token / role markers as single ids (bunny.model.special_tokens)
    return finish_model(model, tokenizer, stats_folder=_stats_folder(vision_path), add_tokens=True)


def _stats_folder(vision_path: str | Path) -> Path | None:
    """The folder whose preprocessor_config.json holds the image statistics (None: encoder defaults)."""
    path = Path(vision_path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "preprocessor_config.json").is_file() else None
