"""The Bunny model: vision encoders, projectors, LLM families, the model and its processor.

Importing this package registers ``bunny`` (and our MiniCPM port, ``minicpm``) with transformers'
Auto classes, so saved folders load with ``AutoConfig`` / ``AutoModelForImageTextToText`` without
``trust_remote_code``.
"""

from __future__ import annotations

from bunny.model.minicpm import register_minicpm
from bunny.model.modeling import BunnyConfig, BunnyForConditionalGeneration, register_auto_classes

register_minicpm()
register_auto_classes()

__all__ = ["BunnyConfig", "BunnyForConditionalGeneration"]
