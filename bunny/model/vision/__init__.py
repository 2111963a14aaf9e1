"""Vision encoders: one small registered file per family, one shared interface (``base.py``).

Every module of this package except ``base`` and ``s2`` is an encoder that registers itself with
``@VISION_ENCODERS.register("name")`` beside its class and declares the config ``model_type`` values
it reads (``config_model_types``). Modules are discovered, so adding an encoder is adding its file:
building, deserialising ``BunnyConfig.vision_config``, detecting a checkpoint folder, the image
statistics and the tiny test configs all go through the class.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PretrainedConfig

from bunny.model.files import read_json
from bunny.model.vision.base import (
    FEATURE_SELECTS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VISION_ENCODERS,
    VisionEncoder,
    resolve_feature_layer,
)
from bunny.model.vision.s2 import S2Wrapper
from bunny.registry import import_parts

_NOT_ENCODERS = {"base", "s2"}
import_parts(__name__, __path__, _NOT_ENCODERS)


def build_vision_encoder(
    name: str,
    vision_config: PretrainedConfig,
    feature_layer: int = -2,
    feature_select: str = "patch",
    s2_scales: list[int] | None = None,
) -> nn.Module:
    """The registered encoder, wrapped in S^2 when ``s2_scales`` is given."""
    enc = VISION_ENCODERS.get(name)(vision_config, feature_layer=feature_layer, feature_select=feature_select)
    if s2_scales:
        enc = S2Wrapper(enc, list(s2_scales))
    return enc


def model_type_table() -> dict[str, str]:
    """config ``model_type`` -> encoder name, gathered from the registered classes."""
    table: dict[str, str] = {}
    for name in VISION_ENCODERS.names():
        for model_type in VISION_ENCODERS.get(name).config_model_types:
            table[model_type] = name
    return table


def detect_vision_encoder(path: str | Path) -> str:
    """The encoder registry name for a vision checkpoint folder (or a bare weights file)."""
    path = Path(path)
    bare = [n for n in VISION_ENCODERS.names() if VISION_ENCODERS.get(n).claims_bare_weights]
    if path.is_file() and bare:
        return bare[0]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: vision checkpoint not found")
    config_file = path / "config.json"
    if not config_file.is_file():
        has_weights = any(path.glob("*.pt")) or any(path.glob("*.safetensors")) or any(path.glob("*.pth"))
        if has_weights and bare:
            return bare[0]
        raise FileNotFoundError(f"{path}: no config.json and no weights file: not a vision checkpoint")
    model_type = read_json(config_file).get("model_type")
    table = model_type_table()
    if model_type not in table:
        raise ValueError(
            f"{config_file}: cannot tell the vision encoder from model_type {model_type!r} (known: "
            f"{', '.join(sorted(table))}); pass vision_encoder= one of {', '.join(VISION_ENCODERS.names())}"
        )
    return table[model_type]


__all__ = [
    "FEATURE_SELECTS", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VISION_ENCODERS", "S2Wrapper", "VisionEncoder",
    "build_vision_encoder", "detect_vision_encoder", "model_type_table", "resolve_feature_layer",
]
