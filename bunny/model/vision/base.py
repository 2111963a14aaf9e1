"""The vision encoder base class and registry (``bunny.model.vision`` discovers the encoder files).

Interface every encoder (and ``s2.S2Wrapper``) follows::

    enc = VISION_ENCODERS.get(name)(vision_config, feature_layer=-2, feature_select="patch")
    enc.hidden_size   # feature channels C
    enc.image_size    # input side in pixels (S^2: the largest scale)
    enc.grid          # tokens per side of the patch grid (num_tokens = grid**2 (+ CLS when kept))
    enc.num_tokens    # N
    enc(pixel_values[B, 3, H, W]) -> features[B, N, C]

``feature_layer`` counts like transformers' ``hidden_states``: index 0 is the embedding output,
index i the output of block i, negative indices count from the end (-1 = last block, before any
post-norm; -2 = second-to-last block). Only the blocks needed are run, the weights of the others are
kept so checkpoints load strictly and export to transformers' Llava unchanged.
``feature_select`` is ``"patch"`` (drop the CLS/prefix tokens, if the encoder has any) or ``"full"``
(keep every token). SigLIP has no CLS, so both give its 729 patch tokens.

Each encoder class also knows how to read its own pretrained folder (``from_pretrained``), its
transformers config class (``config_class``, used to deserialise ``BunnyConfig.vision_config``) and
its image processor settings (``image_processor_config``: mean, std, size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from bunny.model.files import read_json, read_state_dict
from bunny.registry import Registry

FEATURE_SELECTS = ("patch", "full")

VISION_ENCODERS: Registry[type[VisionEncoder]] = Registry("vision encoder")


class VisionEncoder(nn.Module):
    """Shared base: feature-layer/CLS handling and folder reading. Subclasses set the class attributes
    and implement ``build`` (and ``forward`` if ``embed``/``blocks`` do not describe them)."""

    #: the encoder's own transformers config class (SiglipVisionConfig, CLIPVisionConfig, ...)
    config_class: type[PretrainedConfig]
    #: number of prefix (CLS) tokens the blocks see before the patch tokens
    num_prefix_tokens: int = 0
    #: the selection a fresh model uses when the user does not give one
    default_feature_select: str = "patch"
    #: ``model_type`` values of a checkpoint's config.json that mean this encoder (detection is data:
    #: ``bunny.model.vision.detect_vision_encoder`` reads these off every registered class)
    config_model_types: tuple[str, ...] = ()
    #: whether a bare weights file (or a folder with weights and no config.json) is this encoder's
    #: release layout (EVA-CLIP ships that way); at most one encoder claims it
    claims_bare_weights: bool = False

    def __init__(self, vision_config: PretrainedConfig, feature_layer: int = -2, feature_select: str = "patch"):
        super().__init__()
        if feature_select not in FEATURE_SELECTS:
            raise ValueError(f"feature_select must be one of {FEATURE_SELECTS}, got {feature_select!r}")
        self.config = vision_config
        self.feature_layer = int(feature_layer)
        self.feature_select = feature_select
        self.image_size = int(vision_config.image_size)
        self.patch_size = int(vision_config.patch_size)
        self.grid = self.image_size // self.patch_size
        self.hidden_size = int(vision_config.hidden_size)
        self.num_blocks_run = resolve_feature_layer(self.feature_layer, int(vision_config.num_hidden_layers))
        self.build(vision_config)

    # -- to implement ---------------------------------------------------------------------------
    def build(self, vision_config: PretrainedConfig) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """pixel_values -> the hidden states the first block sees ([B, prefix + grid**2, C])."""
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.count_tokens(self.config, self.feature_select)

    @classmethod
    def count_tokens(cls, vision_config: PretrainedConfig, feature_select: str) -> int:
        """Tokens per image for a config, without building the module (BunnyConfig uses it)."""
        grid = int(vision_config.image_size) // int(vision_config.patch_size)
        return grid * grid + (cls.num_prefix_tokens if feature_select == "full" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(pixel_values.to(self.dtype))
        for block in self.blocks()[: self.num_blocks_run]:
            hidden = block(hidden, None)
        if self.feature_select == "patch" and self.num_prefix_tokens:
            hidden = hidden[:, self.num_prefix_tokens :]
        return hidden

    # -- folders --------------------------------------------------------------------------------
    @classmethod
    def config_from_pretrained(cls, path: str | Path) -> PretrainedConfig:
        """The vision config of a local folder: a bare vision-model folder or a full two-tower one."""
        raw = read_json(Path(path) / "config.json")
        if "vision_config" in raw:  # SiglipModel / CLIPModel: take the vision half
            raw = dict(raw["vision_config"])
        raw.pop("model_type", None)
        raw.pop("architectures", None)
        return cls.config_class(**raw)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        feature_layer: int = -2,
        feature_select: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> VisionEncoder:
        """Build the encoder from a local folder and load its weights (vision part only)."""
        config = cls.config_from_pretrained(path)
        enc = cls(config, feature_layer=feature_layer, feature_select=feature_select or cls.default_feature_select)
        state = read_state_dict(path)
        enc.load_weights(state, source=str(path))
        if dtype is not None:
            enc.to(dtype)
        return enc

    #: prefixes under which a vision tower's keys may appear in a checkpoint (first match wins)
    checkpoint_prefixes: tuple[str, ...] = ("vision_model.", "")
    #: prefixes of keys that belong to other towers and are dropped silently
    foreign_prefixes: tuple[str, ...] = ("text_model.", "logit_scale", "logit_bias", "text_projection", "visual_projection")

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a vision-model state dict (bare keys, or keys under ``vision_model.``) strictly."""
        own = self.inner_module().state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for prefix in self.checkpoint_prefixes:
            mapped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
            if mapped:
                break
        leftovers = [
            k
            for k in state
            if not any(k.startswith(p) for p in self.foreign_prefixes)
            and not any(k.startswith(p) and k[len(p) :] in mapped for p in self.checkpoint_prefixes)
        ]
        missing = sorted(set(own) - set(mapped))
        if missing or leftovers:
            raise ValueError(
                f"{source}: vision weights do not match the {type(self).__name__} layout; "
                f"missing {len(missing)}: {missing[:8]}; unexpected {len(leftovers)}: {sorted(leftovers)[:8]}"
            )
        self.inner_module().load_state_dict(mapped, strict=True)

    def inner_module(self) -> nn.Module:
        """The wrapped transformers module whose state dict is the checkpoint's vision part."""
        return self.vision_tower

    @classmethod
    def tiny_config_extras(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Extra config fields a tiny test config of this encoder needs, given the tiny sizes
        (``bunny.model.tiny``); explicit overrides win over these."""
        return {}

    #: normalisation used when a vision folder has no preprocessor_config.json (fresh/tiny models)
    default_image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    default_image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def image_processor_config(cls, path: str | Path | None, vision_config: PretrainedConfig | None = None) -> dict:
        """``{"image_mean", "image_std", "size"}`` from the folder's preprocessor_config.json.

        Falls back to the encoder's default statistics for a missing file only when ``vision_config``
        is given (the size then comes from the config); otherwise a missing file is an error.
        """
        file = Path(path) / "preprocessor_config.json" if path is not None else None
        if file is not None and file.is_file():
            raw = read_json(file)
            size = raw.get("crop_size") if raw.get("do_center_crop") else None
            size = size or raw.get("size")
            if isinstance(size, dict):
                size = size.get("height") or size.get("shortest_edge") or size.get("width")
            return {"image_mean": list(raw["image_mean"]), "image_std": list(raw["image_std"]), "size": int(size)}
        if vision_config is None:
            raise FileNotFoundError(f"{file}: no preprocessor_config.json (image mean/std/size) in the vision folder")
        return {"image_mean": list(cls.default_image_mean), "image_std": list(cls.default_image_std),
                "size": int(vision_config.image_size)}


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """How many blocks to run so the last one's output is ``hidden_states[feature_layer]``."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"vision feature_layer {feature_layer} is out of range for {num_layers} layers")
    return index
