"""The one place that finishes a model: its processor, generation settings and template tokens.

Every way of getting a model (assembled from parts, a tiny random one, an original Bunny release,
a transformers Llava folder) ends the same way, and it used to be written out four times:

1. a ``BunnyProcessor`` for the config (image-token id and count, chat template) around the
   tokenizer and an image processor (by default the config's, with the vision folder's mean/std);
2. where the model is *built* (not loaded from a folder trained with its tokenizer), the chat
   template's special strings become single tokens (``bunny.model.special_tokens``);
3. the generation config's end/pad/bos ids (``bunny.model.generation``);
4. eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bunny.data.templates import get_template
from bunny.model.generation import configure_generation
from bunny.model.processing import BunnyImageProcessor, BunnyProcessor
from bunny.model.special_tokens import add_template_tokens, warn_if_split


def finish_model(
    model: Any,
    tokenizer: Any,
    image_processor: BunnyImageProcessor | None = None,
    *,
    stats_folder: str | Path | None = None,
    add_tokens: bool = False,
) -> tuple[Any, BunnyProcessor]:
    """``(model, processor)`` ready to use (see the module docstring for the steps).

    ``image_processor``: default ``BunnyImageProcessor.for_config(model.config, stats_folder)``.
    ``add_tokens``: make the template's special strings single tokens (grows the embeddings; only
    for models being built, never for a loaded folder whose weights know its tokenizer's ids).
    """
    if image_processor is None:
        image_processor = BunnyImageProcessor.for_config(model.config, stats_folder)
    processor = BunnyProcessor.for_config(tokenizer, image_processor, model.config)
    configure_generation(model, processor)
    if add_tokens:
        add_template_tokens(model, processor)  # recomputes the end ids when it adds tokens
    model.eval()
    return model, processor


def set_chat_template(model: Any, processor: BunnyProcessor, name: str) -> None:
    """Prompt a loaded model with the chat template ``name`` instead of its own (a ``--template``
    override): the config, the processor and the generation end ids all follow, so prompts and the
    stop token agree. An unknown name lists the known ones; a template whose special strings the
    tokenizer splits gets the same warning as at load time (nothing is added to a loaded model)."""
    get_template(name)  # unknown -> UnknownNameError listing the templates
    model.config.chat_template = name
    processor.chat_template = name
    configure_generation(model, processor)
    warn_if_split(model, processor, f"--template {name}")
