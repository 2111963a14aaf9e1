"""Chat templates: conversations -> ``input_ids`` + ``labels`` built by construction, and prompts.

The shared machinery (``ChatTemplate``, ``TEMPLATES``, the tokenization helpers) lives in
``base.py``; every other module of this package is one template that registers itself with
``TEMPLATES.register(name, instance)`` beside its class. Templates are discovered: adding one is
adding its file. See ``base.py`` for the contract.
"""

from __future__ import annotations

from bunny.data.templates.base import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    ChatTemplate,
    Segment,
    encode_segments,
    forget_tokenizer,
    get_template,
    normalize_messages,
    tokenize_text,
    tokenizer_facts,
)
from bunny.registry import import_parts

import_parts(__name__, __path__)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "TEMPLATES",
    "ChatTemplate",
    "Segment",
    "encode_segments",
    "forget_tokenizer",
    "get_template",
    "normalize_messages",
    "tokenize_text",
    "tokenizer_facts",
]
