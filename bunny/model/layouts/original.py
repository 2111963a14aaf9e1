"""Original Bunny release folders (``model_type: bunny-*``, e.g. BAAI/Bunny-v1_0-3B) -> our model.

A release folder holds one config.json that is the LLM's config plus Bunny's fields
(``mm_vision_tower``, ``mm_projector_type``, ``mm_hidden_size``, ``use_s2``, ``image_aspect_ratio``),
the tokenizer, and weights with these keys (RECIPE.md, "Checkpoints users already have")::

    release key                                          ours
    model.vision_tower.vision_tower.vision_model.<k>     vision_tower.vision_tower.<k>   (SigLIP/CLIP, 4.x keys)
    model.vision_tower.vision_tower.<k>                  vision_tower.vision_tower.<k>   (transformers-5 bare keys)
    model.vision_tower.vision_tower.model.<k>            vision_tower.vision_tower.<k>   (EVA-CLIP tower)
    model.mm_projector.<k>                               mm_projector.<k>
    model.<k> (embed_tokens, layers, norm, ...)          language_model.model.<k>
    lm_head.<k>                                          language_model.lm_head.<k>

The vision architecture comes from ``mm_vision_tower``: a local folder (absolute, or relative to the
release folder) is read (its config.json, and its preprocessor_config.json for mean/std); a hub id
is looked up in the HF cache first (only those two files are needed), then one of the reference
towers (RECIPE.md) uses the built-in config, so a release folder loads offline without the tower
being downloaded (its weights are in the release already); any other hub id has its two config
files downloaded (``bunny.model.hub``). Keys that fit
nowhere, and parameters nothing fills, are listed in the error. Parameters of vision blocks the
model never runs (the last block, SigLIP's pooling head) may be absent: Bunny's forward never uses
them; they are zero-filled and reported in the log.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, SiglipVisionConfig

from bunny.model.files import read_json, read_state_dict
from bunny.model.finish import finish_model
from bunny.model.hub import HubNameError, is_hub_name, resolve_folder
from bunny.model.language import LLM_FAMILIES
from bunny.model.layouts.base import LAYOUTS, Layout
from bunny.model.layouts.weights import assign_state_dict, build_without_init, rename_keys
from bunny.model.modeling import BunnyConfig
from bunny.model.processing import BunnyImageProcessor, BunnyProcessor
from bunny.model.special_tokens import add_image_token
from bunny.model.vision import VISION_ENCODERS, detect_vision_encoder
from bunny.model.vision.eva_clip import EvaVisionConfig

log = logging.getLogger(__name__)

#: release model_type -> (transformers model_type of the LLM config, our LLM family, chat template).
#: The template is the one the release was trained with: every release used Bunny's own format
#: (the original ``bunny/conversation.py``), only the end token (``sep2``) differs: ``conv_bunny``
#: (``<|endoftext|>``) for Phi, Phi-3, StableLM and Qwen, ``conv_minicpm`` (``</s>``) and ``conv_llama``
#: (``<|end_of_text|>``); its evaluation guide switches the mode only for MiniCPM and Llama-3. The
#: families' own templates (``phi3``, ``llama3``, ``minicpm``) would prompt these models in a format
#: they never saw.
RELEASE_TYPES = {
    "bunny-phi": ("phi", None, "bunny"),  # phi-1.5 or phi-2, told apart by the width
    "bunny-phi3": ("phi3", "phi-3", "bunny"),
    "bunny-stablelm": ("stablelm", "stablelm-2", "bunny"),
    "bunny-qwen2": ("qwen2", "qwen1.5", "bunny"),
    "bunny-minicpm": ("minicpm", "minicpm", "bunny-minicpm"),
    "bunny-llama": ("llama", "llama-3", "bunny-llama3"),
}


#: the reference towers (RECIPE.md), for release folders whose mm_vision_tower is a hub id
KNOWN_TOWERS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "google/siglip-so400m-patch14-384": (
        "siglip",
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
             image_size=384, patch_size=14),
        dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    ),
    "openai/clip-vit-large-patch14-336": (
        "clip",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
    ),
}
#: the files of a tower folder a release needs (its weights are in the release)
TOWER_FILES = ["config.json", "preprocessor_config.json"]
EVA_NAMES = ("EVA02_CLIP_L_336_psz14_s6B", "EVA02-CLIP-L-14-336", "eva02_clip_l_336")

#: Bunny's own config fields, removed before building the LLM config
BUNNY_FIELDS = re.compile(
    r"^(mm_.*|use_s2|s2_scales|image_aspect_ratio|tokenizer_.*|tune_mm_mlp_adapter|freeze_mm_mlp_adapter|"
    r"unfreeze_vision_tower|use_mm_proj|architectures|auto_map|model_type|_name_or_path|transformers_version)$"
)
#: StableLM-epoch (the remote code Bunny used) field names -> transformers' StableLmConfig names
STABLELM_FIELDS = {"norm_eps": "layer_norm_eps", "rope_pct": "partial_rotary_factor"}

RELEASE_TO_OURS = [
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.|model\.(?:visual\.)?)?", "vision_tower.vision_tower."),
    (r"^model\.mm_projector\.", "mm_projector."),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
_ROPE_TABLE = re.compile(r"(^|\.)rope\.freqs_(cos|sin)$")


def load_original_bunny(path: Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
                        ) -> tuple[Any, BunnyProcessor]:
    """A release folder as ``(BunnyForConditionalGeneration, BunnyProcessor)``."""
    config_file = path / "config.json"
    raw = read_json(config_file)
    release_type = raw.get("model_type")
    if release_type not in RELEASE_TYPES:
        raise ValueError(f"{config_file}: model_type {release_type!r} is not a known Bunny release "
                         f"(known: {', '.join(sorted(RELEASE_TYPES))})")
    for field in ("mm_vision_tower", "mm_projector_type"):
        if not raw.get(field):
            raise ValueError(f"{config_file}: missing field {field!r}")
    text_type, family, template = RELEASE_TYPES[release_type]
    text_raw = {k: v for k, v in raw.items() if not BUNNY_FIELDS.match(k)}
    if text_type == "stablelm":
        text_raw = {STABLELM_FIELDS.get(k, k): v for k, v in text_raw.items()}
    text_config = AutoConfig.for_model(text_type, **text_raw)
    if family is None:
        family = "phi-2" if text_config.hidden_size == 2560 else "phi-1.5"

    encoder, vision_config, stats = resolve_vision_tower(raw["mm_vision_tower"], path)
    s2_scales = None
    if raw.get("use_s2"):
        scales = raw.get("s2_scales") or "384,768,1152"
        s2_scales = [int(s) for s in str(scales).split(",")] if isinstance(scales, str) else [int(s) for s in scales]
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    image_token_id = add_image_token(tokenizer)
    config = BunnyConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_encoder=encoder,
        vision_feature_layer=-2,
        s2_scales=s2_scales,
        projector_type=raw["mm_projector_type"],
        image_aspect_ratio=raw.get("image_aspect_ratio") or "pad",
        image_token_id=image_token_id,
        llm_family=family,
        chat_template=template,
    )
    LLM_FAMILIES.get(family).check_config(text_config)
    model = build_without_init(config)
    expected_hidden = raw.get("mm_hidden_size")
    if expected_hidden is not None and int(expected_hidden) != model.vision_tower.hidden_size:
        raise ValueError(f"{config_file}: mm_hidden_size {expected_hidden} does not match the vision tower "
                         f"{raw['mm_vision_tower']!r} ({model.vision_tower.hidden_size} feature channels)")
    state, origin = rename_keys(read_state_dict(path), RELEASE_TO_OURS)
    unused = unused_vision_keys(model)
    tolerated = assign_state_dict(
        model, state, source=str(path), origin=origin, dtype=dtype,
        ignore_unexpected=lambda k: bool(_ROPE_TABLE.search(k)),
        allow_missing=lambda k: k in unused,
    )
    if tolerated:
        log.info("%s: %d parameters of vision blocks the model never runs were absent (zero-filled): %s",
                 path, len(tolerated), ", ".join(tolerated[:6]))
    image_processor = BunnyImageProcessor(size=config.image_size, image_mean=stats["image_mean"],
                                          image_std=stats["image_std"], image_aspect_ratio=config.image_aspect_ratio)
    return finish_model(model, tokenizer, image_processor)


@LAYOUTS.register("bunny-original")
class OriginalLayout(Layout):
    name = "bunny-original"
    described = "'bunny-*' (original Bunny releases)"
    order = 30

    @classmethod
    def detect(cls, folder: Path, config: dict | None) -> bool:
        model_type = (config or {}).get("model_type")
        return isinstance(model_type, str) and model_type.startswith("bunny-")

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[Any, BunnyProcessor]:
        return load_original_bunny(folder, dtype=dtype, trust_remote_code=trust_remote_code)


def resolve_vision_tower(name: str, release_dir: Path) -> tuple[str, Any, dict[str, Any]]:
    """``(encoder name, vision config, {"image_mean", "image_std"})`` for a release's ``mm_vision_tower``."""
    candidates = [Path(name).expanduser(), release_dir / name]
    local = next((c for c in candidates if c.exists()), None)
    hub_error = None
    if local is None and is_hub_name(name):
        try:  # the tower's own config from the HF cache (its weights are in the release already)
            local = resolve_folder(name, allow_patterns=TOWER_FILES, what="mm_vision_tower", local_only=True)
        except HubNameError as exc:
            hub_error = exc
    if local is None and name in KNOWN_TOWERS:
        encoder, values, stats = KNOWN_TOWERS[name]
        config_cls = SiglipVisionConfig if encoder == "siglip" else CLIPVisionConfig
        return encoder, config_cls(**values), dict(stats)
    if local is None and (Path(name).name.split(".")[0] in EVA_NAMES or Path(name).stem in EVA_NAMES):
        cls = VISION_ENCODERS.get("eva_clip")
        config = EvaVisionConfig()
        return "eva_clip", config, cls.image_processor_config(None, config)
    if local is None and hub_error is not None:
        try:  # an unknown tower: its config files from the hub (nothing is downloaded offline)
            local = resolve_folder(name, allow_patterns=TOWER_FILES, what="mm_vision_tower")
        except HubNameError as exc:
            hub_error = exc
    if local is not None:
        encoder = detect_vision_encoder(local)
        cls = VISION_ENCODERS.get(encoder)
        config = cls.config_from_pretrained(local)
        stats = cls.image_processor_config(local if local.is_dir() else None, config)
        return encoder, config, stats
    raise FileNotFoundError(
        f"mm_vision_tower {name!r} is not a local folder (looked at {', '.join(str(c) for c in candidates)}) and not "
        f"one of the known towers ({', '.join(sorted(KNOWN_TOWERS))}, EVA02-CLIP-L-336)"
        + (f"; {hub_error}" if hub_error else "") + "; download it and set mm_vision_tower in config.json to the folder")


def unused_vision_keys(model: Any) -> set[str]:
    """State-dict keys of vision-tower parameters the forward never touches (blocks past the feature
    layer, post-norms and pooling heads)."""
    tower = model.vision_tower
    run = tower.encoder.num_blocks_run if hasattr(tower, "encoder") else tower.num_blocks_run
    out = set()
    for key in model.state_dict():
        if not key.startswith("vision_tower.vision_tower."):
            continue
        rest = key[len("vision_tower.vision_tower."):]
        m = re.match(r"^(?:encoder\.layers|blocks)\.(\d+)\.", rest)
        if (m and int(m.group(1)) >= run) or re.match(r"^(head|post_layernorm|norm|fc_norm)\.", rest):
            out.add(key)
    return out
