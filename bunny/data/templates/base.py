"""Chat templates (the shared base): conversations -> ``input_ids`` + ``labels`` built by construction, and prompts.

Why by construction: LLaVA-family repos render the whole conversation to one string, tokenize
it, then re-tokenize pieces to guess where the assistant replies start; whenever a BPE merge
crosses a piece boundary the guess is off ("tokenization mismatch") and the sample is silently
dropped or mislabelled. Here a template turns a conversation into a list of *segments* — masked
text, learned text, image placeholders — and each segment is tokenized on its own; ``input_ids``
and ``labels`` are the concatenations. What carries loss is therefore exactly the assistant replies
and their end tokens, whatever the tokenizer does.

Segment boundaries are placed where tokenization of the whole text splits anyway (at special
tokens, ``<image>``, and before the space that opens a Bunny reply), so for byte-level BPE
tokenizers ``tokenizer(render(...))`` gives the same ids as :meth:`ChatTemplate.encode` — most
importantly for the inference prompt, whose tokens equal the training prefix of the reply
(tested in ``tests/test_templates.py``; docs/data.md lists the one documented exception).

Contract (docs/architecture.md):
- ``encode(conversations, tokenizer, image_token_id, num_image_tokens) -> (input_ids, labels)``
- ``render(messages, add_generation_prompt=True) -> str``: the prompt text for inference. It
  does **not** contain the BOS token: tokenize it with the tokenizer's default special tokens,
  which add the BOS exactly where :meth:`encode` puts one.
- ``stop_strings`` / ``end_token`` for generation; :meth:`end_token_ids` for a tokenizer.
- ``special_tokens``: the strings (end token, role markers) that must be single tokens of the
  tokenizer; model assembly adds missing ones (``bunny.model.special_tokens``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bunny.registry import Registry

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation; ``learned`` pieces carry loss."""

    text: str
    learned: bool


def normalize_messages(conversations: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """LLaVA turns (``{"from", "value"}``) or chat messages (``{"role", "content"}``) ->
    ``[{"role": "system"|"user"|"assistant", "content": str}]``."""
    out = []
    for i, turn in enumerate(conversations):
        if "from" in turn:
            role, content = turn["from"], turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
        if role not in ROLE_ALIASES:
            raise ValueError(f"turn {i}: unknown role {role!r}; known: {', '.join(sorted(ROLE_ALIASES))}")
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


class ChatTemplate:
    """Base class: a template is a handful of text pieces; rendering and encoding are shared.

    Rendered conversation (``S`` = system, ``U`` = user content, ``A`` = assistant content)::

        system_text(S) + user_text(U1) + generation_prefix + reply_text(A1) + end_token + after_reply
                       + user_text(U2) + generation_prefix + reply_text(A2) + end_token + after_reply ...

    Only ``reply_text(A)`` and ``end_token`` are learned. Everything else (and the BOS that the
    tokenizer adds by default, and every image token) has label ``IGNORE_INDEX``.
    """

    name: str = "base"
    default_system: str | None = None
    end_token: str = ""
    extra_stop_strings: tuple[str, ...] = ()
    #: strings the format relies on being ONE token each (its end token, role markers): the model
    #: learns and generates each as a single id, and generation stops on the end token's id. Empty
    #: for formats of plain text (``plain``'s end token is a newline).
    special_tokens: tuple[str, ...] = ()

    # ---- the pieces a template defines -------------------------------------------------
    def system_text(self, system: str) -> str:
        return ""

    def user_text(self, content: str) -> str:
        raise NotImplementedError

    @property
    def generation_prefix(self) -> str:
        return ""

    def reply_text(self, content: str) -> str:
        return content

    @property
    def after_reply(self) -> str:
        return ""

    # ---- shared behaviour --------------------------------------------------------------
    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.end_token, *self.extra_stop_strings)))

    def segments(self, conversations: Iterable[Mapping[str, Any]], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as masked/learned text segments (``<image>`` still inside the text)."""
        messages = normalize_messages(conversations)
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"]
            messages = messages[1:]
        masked = self.system_text(system) if system is not None else ""
        out: list[Segment] = []
        for i, msg in enumerate(messages):
            if msg["role"] == "user":
                masked += self.user_text(msg["content"])
            elif msg["role"] == "assistant":
                masked += self.generation_prefix
                if masked:
                    out.append(Segment(masked, False))
                out.append(Segment(self.reply_text(msg["content"]), True))
                out.append(Segment(self.end_token, True))
                masked = self.after_reply
            else:
                raise ValueError(f"turn {i}: a system message is only allowed first")
        if add_generation_prompt:
            masked += self.generation_prefix
        if masked:
            out.append(Segment(masked, False))
        return out

    def render(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Prompt text for inference (without BOS; ``<image>`` placeholders kept)."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def learned_texts(self, conversations: Iterable[Mapping[str, Any]]) -> list[str]:
        """What each assistant turn contributes to the loss, as text: reply + end token."""
        return [self.reply_text(m["content"]) + self.end_token
                for m in normalize_messages(conversations) if m["role"] == "assistant"]

    def encode(
        self,
        conversations: Iterable[Mapping[str, Any]],
        tokenizer: Any,
        image_token_id: int,
        num_image_tokens: int,
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels for training; ``<image>`` -> ``num_image_tokens`` x ``image_token_id``."""
        return encode_segments(self.segments(conversations), tokenizer, image_token_id, num_image_tokens)

    def encode_prompt(
        self,
        messages: Iterable[Mapping[str, Any]],
        tokenizer: Any,
        image_token_id: int,
        num_image_tokens: int,
    ) -> list[int]:
        """Inference prompt ids built exactly as the training prefix of the next reply."""
        ids, _ = encode_segments(self.segments(messages, add_generation_prompt=True), tokenizer,
                                  image_token_id, num_image_tokens)
        return ids

    def end_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the stop strings that are single tokens of ``tokenizer`` (for ``eos_token_id``)."""
        out = []
        for s in self.stop_strings:
            ids = tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return out

    def __repr__(self) -> str:
        return f"<ChatTemplate {self.name!r} end={self.end_token!r}>"


TEMPLATES: Registry[ChatTemplate] = Registry("chat template")


def get_template(name: str) -> ChatTemplate:
    """The registered template ``name`` (``UnknownNameError`` lists the known ones)."""
    return TEMPLATES.get(name)


# ---- tokenization helpers --------------------------------------------------------------

_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def forget_tokenizer(tokenizer: Any) -> None:
    """Drop the cached facts about ``tokenizer`` (call after adding tokens to it: the anchor may change)."""
    try:
        _CACHE.pop(tokenizer, None)
    except TypeError:  # not weak-referenceable: never cached
        pass


def tokenizer_facts(tokenizer: Any) -> dict[str, Any]:
    """Per-tokenizer facts, computed once: ``prefix`` (the ids the tokenizer adds before any text by
    default, e.g. BOS) and ``anchor`` (see ``_find_anchor``)."""
    try:
        info = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        info = None
    if info is not None:
        return info
    probe = "a"
    with_special = list(tokenizer.encode(probe))
    without = list(tokenizer.encode(probe, add_special_tokens=False))
    prefix: list[int] = []
    for k in range(len(with_special) - len(without) + 1):
        if with_special[k:k + len(without)] == without:
            prefix = with_special[:k]
            break
    info = {"prefix": prefix, "anchor": _find_anchor(tokenizer)}
    try:
        _CACHE[tokenizer] = info
    except TypeError:
        pass
    return info


def _find_anchor(tokenizer: Any) -> tuple[str, int] | None:
    """A special token that tokenizes to one id and strips no neighbouring whitespace.

    Text after a special token is tokenized as a fresh section but *not* as the start of the
    input, so ``encode(anchor + text)[1:]`` is how ``text`` tokenizes in the middle of a
    sequence. That matters for SentencePiece-style tokenizers, which prefix the first word of an
    input with a space marker; for byte-level BPE it equals ``encode(text)``.
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    candidates = []
    for attr in ("eos_token", "bos_token", "pad_token", "unk_token"):
        tok = getattr(tokenizer, attr, None)
        if isinstance(tok, str) and tok:
            candidates.append(tok)
    candidates += [str(t) for t in decoder.values()]
    for tok in dict.fromkeys(candidates):
        ids = tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1:
            continue
        added = decoder.get(ids[0])
        if added is not None and (getattr(added, "lstrip", False) or getattr(added, "rstrip", False)):
            continue
        probe = tokenizer.encode(tok + " x", add_special_tokens=False)
        if probe and probe[0] == ids[0]:
            return tok, ids[0]
    return None


def tokenize_text(tokenizer: Any, text: str, at_start: bool) -> list[int]:
    """Ids of ``text`` as it tokenizes at the start of an input, or after other tokens."""
    if not text:
        return []
    anchor = None if at_start else tokenizer_facts(tokenizer)["anchor"]
    if anchor is None:
        return list(tokenizer.encode(text, add_special_tokens=False))
    tok, tid = anchor
    ids = list(tokenizer.encode(tok + text, add_special_tokens=False))
    if not ids or ids[0] != tid:  # pragma: no cover - guarded by _find_anchor
        return list(tokenizer.encode(text, add_special_tokens=False))
    return ids[1:]


def encode_segments(
    segments: Sequence[Segment], tokenizer: Any, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Segments -> ``(input_ids, labels)``: each segment tokenized on its own (see the module docstring),
    ``<image>`` -> ``num_image_tokens`` x ``image_token_id``, learned segments labelled, the rest ignored."""
    if num_image_tokens < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
    prefix = tokenizer_facts(tokenizer)["prefix"]
    ids: list[int] = list(prefix)
    labels: list[int] = [IGNORE_INDEX] * len(prefix)
    at_start = True
    for seg in segments:
        pieces = seg.text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k > 0:
                if seg.learned:
                    raise ValueError(f"{IMAGE_PLACEHOLDER} inside an assistant reply is not supported")
                ids.extend([image_token_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                at_start = False
            part = tokenize_text(tokenizer, piece, at_start)
            if image_token_id in part:
                # The model would take it for an image position and fail on the count.
                raise ValueError(f"text {piece[:40]!r} tokenizes to the image token id {image_token_id}")
            if part:
                at_start = False
            ids.extend(part)
            labels.extend(part if seg.learned else [IGNORE_INDEX] * len(part))
    return ids, labels
