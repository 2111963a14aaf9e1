"""Tiny random Bunny models for tests, examples and benchmarks: any encoder x any LLM family.

Why in the package and not only in tests: the training config's ``tiny`` backbones, the demo and
the benchmarks build the same small models; one definition keeps them comparable. Sizes are chosen
so a model builds and runs a forward pass in well under a second on a CPU (28 px images, 7 px
patches -> 16 image tokens; two 32-wide layers on each side).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from bunny.model.finish import finish_model
from bunny.model.language import LLM_FAMILIES
from bunny.model.modeling import BunnyConfig, BunnyForConditionalGeneration
from bunny.model.vision import VISION_ENCODERS

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=28, patch_size=7)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)

#: model_type of the tiny text config per family (``generic`` uses an architecture no family claims)
FAMILY_MODEL_TYPE = {
    "phi-1.5": "phi", "phi-2": "phi", "phi-3": "phi3", "stablelm-2": "stablelm", "qwen1.5": "qwen2",
    "qwen2": "qwen2", "minicpm": "minicpm", "llama-3": "llama", "smollm2": "llama",
    "generic": "mistral",
}
#: per-architecture extras (fields the tiny defaults do not cover, or that must be small)
_TEXT_EXTRAS: dict[str, dict[str, Any]] = {
    "phi": dict(partial_rotary_factor=0.5),
    "minicpm": dict(scale_emb=12.0, dim_model_base=16, scale_depth=1.4),
    "stablelm": dict(partial_rotary_factor=0.25),
}


def tiny_vision_config(vision: str = "siglip", **overrides: Any) -> PretrainedConfig:
    """The encoder's own config class with tiny sizes (``overrides`` win)."""
    cls = VISION_ENCODERS.get(vision).config_class
    values = {**TINY_VISION, **overrides}
    values = {**VISION_ENCODERS.get(vision).tiny_config_extras(values), **values}
    return cls(**values)


def tiny_text_config(family: str = "qwen2", vocab_size: int = 1024, bos_token_id: int | None = None,
                     eos_token_id: int | None = None, pad_token_id: int | None = None,
                     **overrides: Any) -> PretrainedConfig:
    """A tiny causal-LM config of the family's architecture."""
    LLM_FAMILIES.get(family)  # unknown family -> error listing the known ones
    model_type = FAMILY_MODEL_TYPE[family]
    values: dict[str, Any] = {**TINY_TEXT, **_TEXT_EXTRAS.get(model_type, {})}
    values.update(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, tie_word_embeddings=False)
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def round_vocab(n: int, multiple: int = 8) -> int:
    return (n + multiple - 1) // multiple * multiple


def tiny_model(
    tokenizer: Any,
    vision: str = "siglip",
    family: str = "qwen2",
    projector_type: str = "mlp2x_gelu",
    s2_scales: list[int] | None = None,
    image_aspect_ratio: str = "pad",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    vision_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
    **config_overrides: Any,
):
    """A random tiny ``(model, processor)``; the tokenizer must hold an ``<image>`` token, whose id
    becomes ``image_token_id`` (inside the vocabulary, so the model exports to transformers' Llava).
    The chat template's special strings missing from the tokenizer are added to it (in place) as
    special tokens, with embedding rows (``bunny.model.special_tokens``).
    """
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <image> token; add it as a special token first")
    text_overrides = dict(text_overrides or {})
    # a larger vocabulary than the tokenizer's may be asked for (benchmarks: the lm_head cost of a 32k vocab)
    vocab_size = max(int(text_overrides.pop("vocab_size", 0)), round_vocab(len(tokenizer)))
    text_config = tiny_text_config(
        family, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text_overrides)
    config = BunnyConfig(
        vision_config=tiny_vision_config(vision, **(vision_overrides or {})),
        text_config=text_config,
        vision_encoder=vision,
        llm_family=family,
        projector_type=projector_type,
        s2_scales=s2_scales,
        image_aspect_ratio=image_aspect_ratio,
        image_token_id=image_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = BunnyForConditionalGeneration(config)
    if dtype is not None:
        model.to(dtype)
    # a tokenizer trained on the data has no <|im_end|> etc.: make the template's tokens single ids
    return finish_model(model, tokenizer, add_tokens=True)
