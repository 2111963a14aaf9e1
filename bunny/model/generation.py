"""Generation settings of a model: where ``model.generate`` stops, and its pad/bos ids.

Why a module of its own: the end ids depend on the chat template (its end token) and the tokenizer
(its eos), and are recomputed whenever template tokens are added (``bunny.model.special_tokens``)
as well as when a model is finished (``bunny.model.finish``); both sit above this module.
"""

from __future__ import annotations

from typing import Any

from bunny.data.templates import get_template


def configure_generation(model: Any, processor: Any) -> None:
    """Set the generation config's end ids (the chat template's end token + the tokenizer's eos) and
    pad id, so ``model.generate`` stops where the template's turns end."""
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
