"""A request's cost, bounded before the expensive work starts.

Why: tokenizing a 20 MB prompt takes tens of seconds of CPU and leaves gigabytes of tokenizer
buffers behind, only to learn that it does not fit the model. Every costly input therefore has a
cheap bound that is checked first:

* prompt text: a prompt that fits the context has at most ``context`` tokens, and no token stands
  for more characters than the longest vocabulary entry, so ``context x longest entry`` characters
  is an upper bound on any prompt that can fit. Text over it is refused from its length alone (in
  microseconds); text under it gets the exact token check, whose cost this bound caps.
* messages and content parts: counted before any is parsed (``ServerLimits.max_messages``).
* stop strings: at most 4 (as OpenAI), each at most ``ServerLimits.max_stop_chars`` characters.
* images: counted before decoding (``max_images``), bytes checked before base64 decoding, pixels
  read from the header before the pixels are (see ``bunny.serve.app.decode_image``).
"""

from __future__ import annotations

from typing import Any


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one vocabulary entry can stand for (its stored form: byte-level BPE stores
    one character per byte, SentencePiece one per character plus ``<0x..>`` byte pieces; both are at
    least the decoded length)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=0) or 64


def prompt_char_limit(context: int | None, tokenizer: Any) -> int | None:
    """Characters above which no prompt can fit ``context`` tokens (None: the context is unknown)."""
    if not context:
        return None
    return int(context) * longest_token_chars(tokenizer)


def check_prompt_chars(messages: list[dict[str, str]], limit: int | None, context: int | None) -> None:
    """Refuse, from its length alone, a prompt that cannot fit the context (ValueError)."""
    if limit is None:
        return
    chars = sum(len(m["content"]) for m in messages)
    if chars > limit:
        raise ValueError(f"the prompt is {chars} characters: over the {limit} that the model's context of {context} "
                         "tokens can hold at most (refused before tokenizing)")
