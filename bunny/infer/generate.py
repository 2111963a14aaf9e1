"""Batched generation for many (images, conversation) pairs: left padding, stop strings, streaming.

Why a layer over ``model.generate``: every front end (chat, HTTP API, web page, evaluation) needs
the same steps (render the chat template, expand images, left-pad a batch, stop each row on its
own end token, stop string or token limit, decode, count tokens) and they must give the same answer
for the same input. Doing it once here is what makes ``bunny serve`` == ``bunny chat`` == batched
``generate`` testable.

Per-row state lives in one ``StoppingCriteria`` (:class:`_BatchTracker`) that transformers calls
after every decoding step with the whole batch: it decides which rows are finished (so rows of one
batch may have different ``max_new_tokens`` and stop strings) and streams each row's new text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from bunny.data.templates import IMAGE_PLACEHOLDER

__all__ = ["IMAGE_PLACEHOLDER", "GenerationRequest", "GenerationResult", "Generator", "SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy (the evaluation setting).

    ``stop``: strings that end the reply; the text is cut before the earliest one. A stop string
    that is a single special token of the tokenizer (``<|im_end|>``) acts as an end token.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys can share a batch (they use the same logits processors).

        ``max_new_tokens`` and ``stop`` are per row, so they are not part of the key. Seeded
        sampling returns None (run alone): its draws would otherwise depend on the batch it lands in.
        """
        if self.seed is not None and not self.greedy:
            return None
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        return ("sample", self.temperature, self.top_p, self.repetition_penalty, self.seed)


@dataclass
class GenerationRequest:
    """One conversation: ``messages`` as ``[{"role", "content"}]`` with ``<image>`` placeholders
    in the content, and the images those placeholders stand for, in order."""

    messages: list[dict[str, str]]
    images: list[Image.Image] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length"


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut], cut < len(text)


def _held_back(text: str, stops: Sequence[str]) -> str:
    """``text`` minus a tail that is not final yet: an incomplete multi-byte character (decoded as
    U+FFFD) or the beginning of a stop string, which later tokens may complete."""
    while text.endswith("\ufffd"):
        text = text[:-1]
    longest = max((len(s) - 1 for s in stops), default=0)
    for k in range(min(longest, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return text[:-k]
    return text


class _Row:
    """What one row of the batch has produced so far."""

    def __init__(self, limit: int, stops: tuple[str, ...], end_ids: frozenset[int]) -> None:
        self.limit, self.stops, self.end_ids = limit, stops, end_ids
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None


class _BatchTracker(StoppingCriteria):
    """Called by ``model.generate`` after each step with the whole batch; returns the rows that are done.

    A row ends on one of its end ids (not part of the text), on a stop string (the text is cut
    before it), or at its own token limit. ``on_text(row, delta)`` streams the new text of a row:
    text that could still change (a half-decoded character, a possible start of a stop string) is
    held back until decided, and nothing past a stop string is ever emitted, so the deltas of a row
    always add up to its final text.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, rows: list[_Row],
                 on_text: Callable[[int, str], None] | None,
                 cancelled: Callable[[int], bool] | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.rows = rows
        self.on_text = on_text
        self.cancelled = cancelled

    def _decode(self, row: _Row) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if row.finish is not None:
                continue
            tok = last[i]
            if tok in row.end_ids:
                row.finish = "stop"
            else:
                row.tokens.append(tok)
                if row.stops or self.on_text is not None:
                    row.text, stopped = cut_at_stop(self._decode(row), row.stops)
                    if stopped:
                        row.finish = "stop"
                if row.finish is None and len(row.tokens) >= row.limit:
                    row.finish = "length"
            if row.finish is None and self.cancelled is not None and self.cancelled(i):
                row.finish = "cancelled"
            self._emit(i)
        return torch.tensor([r.finish is not None for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def _emit(self, i: int) -> None:
        if self.on_text is None:
            return
        row = self.rows[i]
        text = row.text if row.finish is not None else _held_back(row.text, row.stops)
        if len(text) > row.emitted:
            self.on_text(i, text[row.emitted:])
            row.emitted = len(text)

    def finish(self) -> None:
        """After ``generate`` returns: rows it stopped for its own reasons (a length cap) end here."""
        for i, row in enumerate(self.rows):
            if row.finish is None:
                row.finish = "length"
            row.text, _ = cut_at_stop(self._decode(row), row.stops)
            self._emit(i)


class Generator:
    """Runs batches of :class:`GenerationRequest` through a Bunny model.

    ``render`` turns messages into the prompt text (the model's chat template by default, whose
    end token and stop strings then end every reply). Only one batch runs at a time (a lock), so
    a server or a web page can share one Generator across threads.
    """

    def __init__(self, model: Any, processor: Any, render: Callable[[list[dict[str, str]]], str] | None = None,
                 model_id: str = "bunny", stop: Sequence[str] | None = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if render is None:
            template = model_template(model)
            render = template_renderer(template)
            stop = template.stop_strings if stop is None else stop
        self.render = render
        self.default_stop = tuple(s for s in (stop or ()) if s)
        self.model_id = model_id
        self._lock = threading.Lock()
        self.end_ids = _end_token_ids(model, self.tokenizer)
        self.max_positions = _max_positions(model)

    # -- request preparation -----------------------------------------------------------------------
    def _row_stops(self, params: SamplingParams) -> tuple[tuple[str, ...], frozenset[int]]:
        """Split stop strings into text stops and end ids (special tokens vanish from decoded text)."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        special.update(int(i) for i in (getattr(self.tokenizer, "added_tokens_decoder", None) or {}))
        texts, ids = [], set(self.end_ids)
        for s in dict.fromkeys((*self.default_stop, *params.stop)):
            enc = self.tokenizer.encode(s, add_special_tokens=False)
            if len(enc) == 1 and enc[0] in special:
                ids.add(int(enc[0]))
            else:
                texts.append(s)
        return tuple(texts), frozenset(ids)

    def prompt(self, request: GenerationRequest, index: int = 0) -> str:
        """The rendered prompt text, checked against the images (a ValueError names the request)."""
        try:
            text = self.render(request.messages)
        except ValueError as exc:
            raise ValueError(f"request {index}: {exc}") from exc
        n = text.count(IMAGE_PLACEHOLDER)
        if n != len(request.images):
            raise ValueError(f"request {index}: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(request.images)} image(s)")
        return text

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, Any]:
        # Left padding, asked for per call: the tokenizer object is shared with other threads.
        return self.processor(text=prompts, images=images or None, return_tensors="pt", padding=True,
                              padding_side="left")

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt length in tokens (image tokens included), as ``generate`` will see it."""
        text = self.prompt(request)
        encode = getattr(self.processor, "encode", None)
        if encode is not None:  # BunnyProcessor: ids without preprocessing the images
            return len(encode(text))
        return int(self._encode([text], list(request.images))["attention_mask"].sum())

    def validate(self, request: GenerationRequest) -> int:
        """Check a request before it is queued; returns its prompt length. Raises ValueError when
        the template rejects the messages or prompt + max_new_tokens exceed the model's context."""
        n = self.count_prompt_tokens(request)
        if self.max_positions and n + request.params.max_new_tokens > self.max_positions:
            raise ValueError(f"the prompt is {n} tokens and max_new_tokens is {request.params.max_new_tokens}: "
                             f"over the model's context of {self.max_positions} tokens")
        return n

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest],
                 on_text: Callable[[int, str], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[GenerationResult]:
        """Generate for ``requests`` in one left-padded batch.

        Requests must share :meth:`SamplingParams.batch_key` (temperature, top_p, repetition
        penalty); ``max_new_tokens`` and ``stop`` may differ per row. ``on_text(row, delta)`` is
        called as text is produced (streaming); ``cancelled(row)`` lets a caller end a row early
        (a client went away). Greedy results do not depend on the batch: positions come from the
        attention mask, so left padding changes nothing.
        """
        if not requests:
            return []
        params = requests[0].params
        keys = {r.params.batch_key() for r in requests}
        if len(keys) > 1 or (None in keys and len(requests) > 1):
            raise ValueError("requests in one batch must share temperature, top_p and repetition_penalty "
                             "(and seeded sampling runs alone)")
        prompts = [self.prompt(r, i) for i, r in enumerate(requests)]
        images = [img for r in requests for img in r.images]
        inputs = self._encode(prompts, images)
        device = next(self.model.parameters()).device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_len = int(inputs["input_ids"].shape[1])
        rows = []
        for r in requests:
            stops, end_ids = self._row_stops(r.params)
            rows.append(_Row(r.params.max_new_tokens, stops, end_ids))
        tracker = _BatchTracker(self.tokenizer, prompt_len, rows, on_text, cancelled)
        # transformers' own end check must not end a row on another row's extra end id (a stop
        # string that is a special token): give it only the ids every row ends on.
        common_end = sorted(frozenset.intersection(*(r.end_ids for r in rows)))
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = common_end[0] if common_end else 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(r.params.max_new_tokens for r in requests),
            "do_sample": not params.greedy,
            "num_beams": 1,
            "repetition_penalty": params.repetition_penalty,
            "eos_token_id": common_end or None,
            "pad_token_id": pad_id,
            "stopping_criteria": StoppingCriteriaList([tracker]),
        }
        if params.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        with self._lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            self.model.generate(**inputs, **kwargs)
        tracker.finish()
        mask = inputs["attention_mask"]
        return [GenerationResult(row.text, int(mask[i].sum()), len(row.tokens),
                                 "length" if row.finish == "length" else "stop")
                for i, row in enumerate(rows)]


def _end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the generation config's eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def _max_positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) or cfg
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def model_template(model: Any) -> Any:
    """The chat template named by the model config (``chat_template``; ``bunny`` when unset)."""
    from bunny.data.templates import get_template

    return get_template(getattr(model.config, "chat_template", None) or "bunny")


def template_renderer(template: Any) -> Callable[[list[dict[str, str]]], str]:
    def render(messages: list[dict[str, str]]) -> str:
        return template.render(messages, add_generation_prompt=True)

    return render


def default_renderer(model: Any, processor: Any = None) -> Callable[[list[dict[str, str]]], str]:
    """The model's chat template as a ``messages -> prompt`` function (kept for callers of the old name)."""
    return template_renderer(model_template(model))
