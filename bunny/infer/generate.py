"""Batched generation for many (images, conversation) pairs: left padding, stop strings, streaming.

Why a layer over ``model.generate``: every front end (chat, HTTP API, web page, evaluation) needs
the same steps — render the chat template, expand images, left-pad a batch, decode per row, cut at
stop strings, count tokens — and they must give the same answer for the same input. Doing it once
here is what makes ``bunny serve`` == ``bunny chat`` == batched ``generate`` testable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy (the evaluation setting)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut], cut < len(text)


class _RowStreamer(BaseStreamer):
    """Receives each step's new tokens for the whole batch and emits per-row text deltas.

    transformers' own streamers handle batch size 1 only; dynamic batching needs one stream per
    row. Each row's tokens are decoded as a whole every step and only the new suffix is emitted,
    so multi-token characters never come out half-decoded (an incomplete UTF-8 tail decodes to
    U+FFFD and is held back until complete). Text past a stop string is never emitted.
    """

    def __init__(self, tokenizer: Any, n_rows: int, stops: Sequence[str], end_ids: set[int],
                 on_text: Callable[[int, str], None]) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.emitted = [0] * n_rows
        self.done = [False] * n_rows
        self.stops = stops
        self.end_ids = end_ids
        self.on_text = on_text
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        ids = value.reshape(len(self.tokens), -1)
        for row in range(len(self.tokens)):
            if self.done[row]:
                continue
            for tok in ids[row].tolist():
                if tok in self.end_ids:
                    self.done[row] = True
                    break
                self.tokens[row].append(tok)
            self._emit(row)

    def _emit(self, row: int) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, self.stops)
        if stopped:
            self.done[row] = True
        elif not self.done[row]:
            # Hold back an incomplete multi-byte character, and any tail that could start a stop string.
            while text.endswith("\ufffd"):
                text = text[:-1]
            hold = max((len(s) - 1 for s in self.stops if s), default=0)
            for k in range(min(hold, len(text)), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.stops if s):
                    text = text[:-k]
                    break
        if len(text) > self.emitted[row]:
            self.on_text(row, text[self.emitted[row]:])
            self.emitted[row] = len(text)

    def end(self) -> None:
        pass


class Generator:
    """Runs batches of :class:`GenerationRequest` through a Bunny model.

    ``render`` turns messages into the prompt text (the model's chat template by default). Only
    one batch runs at a time (a lock), so a server can share one Generator across threads.
    """

    def __init__(self, model: Any, processor: Any, render: Callable[[list[dict[str, str]]], str] | None = None,
                 model_id: str = "bunny") -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.render = render or default_renderer(model, processor)
        self.model_id = model_id
        self._lock = threading.Lock()
        self.end_ids = _end_token_ids(model, self.tokenizer)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        enc = self.processor(text=[self.render(request.messages)], images=request.images or None,
                             return_tensors="pt")
        return int(enc["input_ids"].shape[1])

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest],
                 on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
        """Generate for ``requests`` in one left-padded batch; they must share ``params``.

        ``on_text(row, delta)`` is called as text is produced (streaming). Greedy results do not
        depend on the batch: positions come from the attention mask, so padding changes nothing.
        """
        if not requests:
            return []
        params = requests[0].params
        if any(r.params != params for r in requests):
            raise ValueError("all requests in one batch must share the same sampling params")
        prompts = [self.render(r.messages) for r in requests]
        for i, (p, r) in enumerate(zip(prompts, requests)):
            n = p.count(IMAGE_PLACEHOLDER)
            if n != len(r.images):
                raise ValueError(f"request {i}: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(r.images)} image(s)")
        images = [img for r in requests for img in r.images]
        old_side = getattr(self.tokenizer, "padding_side", "left")
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = old_side
        device = next(self.model.parameters()).device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not params.greedy,
            "num_beams": 1,
            "repetition_penalty": params.repetition_penalty,
            "eos_token_id": sorted(self.end_ids) or None,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if on_text is not None:
            kwargs["streamer"] = _RowStreamer(self.tokenizer, len(requests), params.stop, self.end_ids, on_text)
        with self._lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        results = []
        for row in range(len(requests)):
            new = out[row, prompt_len:].tolist()
            finish = "length"
            kept: list[int] = []
            for tok in new:
                if tok in self.end_ids:
                    finish = "stop"
                    break
                if tok == self.tokenizer.pad_token_id and tok not in self.end_ids:
                    # padding after another row finished: this row ended earlier
                    finish = "stop"
                    break
                kept.append(tok)
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, params.stop)
            if stopped:
                finish = "stop"
            prompt_tokens = int(inputs["attention_mask"][row].sum())
            results.append(GenerationResult(text, prompt_tokens, len(kept), finish))
        return results


def _end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the generation config's eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def default_renderer(model: Any, processor: Any) -> Callable[[list[dict[str, str]]], str]:
    """The chat template named by the model config (``chat_template``), rendering for generation."""
    from bunny.data.templates import TEMPLATES

    name = getattr(model.config, "chat_template", None) or "bunny"
    template = TEMPLATES.get(name)
    if isinstance(template, type):
        template = template()

    def render(messages: list[dict[str, str]]) -> str:
        return template.render(messages, add_generation_prompt=True)

    return render
