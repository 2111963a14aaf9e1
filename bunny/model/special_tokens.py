"""Special tokens of a model's tokenizer: the ``<image>`` token, and a chat template's special
strings as single tokens (add the missing ones when a model is built, warn when a loaded folder
lacks them).

Why: a template's end token (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) and its role markers
(``<|im_start|>``, ``<|start_header_id|>``) are meant to be ONE id each. Training learns the end token
as one label after every reply, and generation stops when the model emits that id
(``generation_config.eos_token_id``). A tokenizer without them (the tiny examples' BPE trained on the
data, an LLM's tokenizer used under another family's template) splits ``<|im_end|>`` into pieces: the
model learns to spell it, no end id exists, and ``bunny chat`` / ``bunny eval`` run to the token limit
printing ``<|im_end|im_end|...``.

So, where a model is built (``bunny.model.finish.finish_model`` for assembly and tiny models; the
training start model), the
missing strings become special tokens and the LLM's embeddings grow to hold them: a new row (input
and output embedding, and the output bias if any) starts as the mean of the existing rows, which
gives the new token ordinary logits instead of a random spike. A string the vocabulary already holds
as a plain entry is only marked special (same id, no new row). A folder that is loaded is not
changed (its weights were trained with its tokenizer's ids): ``warn_if_split`` names the split
strings and the folder instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken

from bunny.data.templates import IMAGE_PLACEHOLDER, forget_tokenizer, get_template
from bunny.model.generation import configure_generation

IMAGE_TOKEN = IMAGE_PLACEHOLDER


class TemplateTokenWarning(UserWarning):
    """A loaded model's tokenizer splits a special string of its chat template into several tokens."""


def add_image_token(tokenizer: Any, image_token: str = IMAGE_TOKEN) -> int:
    """The id of ``image_token`` in ``tokenizer``, added as a special token when missing.

    The embedding matrix is not resized for it: image positions are never looked up (the model
    writes image features there), so an id at or beyond the LLM's vocabulary is fine."""
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]},
                                     replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(image_token))


def is_single_token(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` is one token of ``tokenizer``, alone and between other text (a string that is
    a plain vocabulary entry may still merge with its neighbours inside a sentence)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        return False
    return ids[0] in tokenizer.encode("a" + text + "a", add_special_tokens=False)


def split_template_tokens(tokenizer: Any, template: str) -> list[str]:
    """The special strings of ``template`` that ``tokenizer`` does not keep as single tokens."""
    return [s for s in get_template(template).special_tokens if not is_single_token(tokenizer, s)]


def add_template_tokens(model: Any, processor: Any, templates: str | list[str] | None = None) -> list[str]:
    """Make every special string of ``templates`` (default: the model's ``chat_template``) one token.

    Missing strings are added to ``processor.tokenizer`` as special tokens, the language model's
    embeddings grow to cover the new ids (mean-initialised rows, size a multiple of 8), the text
    config's ``vocab_size`` follows, and the generation config's end ids are recomputed (they now
    include the template's end token). Returns the strings added (empty: nothing changed).
    """
    if templates is None:
        templates = [model.config.chat_template] if model.config.chat_template else []
    elif isinstance(templates, str):
        templates = [templates]
    tok = processor.tokenizer
    missing: list[str] = []
    for name in templates:
        missing += [s for s in split_template_tokens(tok, name) if s not in missing]
    if not missing:
        return []
    size_before = len(tok)
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                                  single_word=False) for s in missing]},
        replace_extra_special_tokens=False)
    forget_tokenizer(tok)
    still = [s for s in missing if not is_single_token(tok, s)]
    if still:  # pragma: no cover - a tokenizer whose added tokens do not split the text
        raise ValueError(f"the tokenizer still splits {still} after adding them as special tokens")
    new_ids = sorted({int(tok.convert_tokens_to_ids(s)) for s in missing} - set(range(size_before)))
    if new_ids:
        _grow_embeddings(model, new_ids, n_old=size_before)
    configure_generation(model, processor)
    return missing


def _grow_embeddings(model: Any, new_ids: list[int], n_old: int) -> None:
    """Rows for ``new_ids`` in the LLM's input/output embeddings, set to the mean of the rows of the
    tokenizer's ``n_old`` earlier ids (minus the image token's, which is never looked up)."""
    lm = model.language_model
    rows = lm.get_input_embeddings().weight.shape[0]
    if max(new_ids) >= rows:
        lm.resize_token_embeddings(max(new_ids) + 1, pad_to_multiple_of=8, mean_resizing=False)
    new_rows = lm.get_input_embeddings().weight.shape[0]
    fill = sorted(set(new_ids) | set(range(rows, new_rows)))
    known = [i for i in range(min(n_old, rows)) if i != model.config.image_token_id]
    with torch.no_grad():
        for module in dict.fromkeys((lm.get_input_embeddings(), lm.get_output_embeddings())):
            if module is None:
                continue
            weight = module.weight
            weight[fill] = weight[known].float().mean(0).to(weight.dtype)
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias[fill] = bias[known].float().mean().to(bias.dtype)
    text_config = model.config.text_config
    if text_config is not lm.config:
        text_config.vocab_size = lm.config.vocab_size


def warn_if_split(model: Any, processor: Any, folder: str | Path) -> list[str]:
    """Warn (``TemplateTokenWarning``) when the tokenizer of a loaded model splits its chat template's
    special strings; returns them. The end token matters most: without one id for it generation
    stops only at a text stop string or the token limit."""
    name = getattr(model.config, "chat_template", None)
    if not name:
        return []
    split = split_template_tokens(processor.tokenizer, name)
    if split:
        end = get_template(name).end_token
        about_end = (f" Its end token {end!r} is not one token, so generation cannot stop on an end id (only on "
                     "the text stop string, if the model spells it exactly, or at the token limit)."
                     if end in split else "")
        warnings.warn(
            f"{folder}: the tokenizer splits {', '.join(repr(s) for s in split)} of chat template {name!r} into "
            f"several tokens.{about_end} The folder was built before bunny added template tokens; rebuild it "
            "(assemble/train again: the tokens are added then) or use a tokenizer that has them.",
            TemplateTokenWarning, stacklevel=3)
    return split
