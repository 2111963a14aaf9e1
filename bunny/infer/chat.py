"""A multi-turn chat session over one Generator: the state behind ``bunny chat`` and the web page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from bunny.infer.generate import (
    IMAGE_PLACEHOLDER,
    GenerationRequest,
    GenerationResult,
    Generator,
    SamplingParams,
)


@dataclass
class ChatSession:
    """Keeps the conversation; the image (if any) is attached to the first user turn after it is set.

    Setting a new image starts a new conversation: the models are trained with one image per
    conversation, and earlier answers about another image would only mislead the next ones.
    """

    generator: Generator
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    _pending_image: Image.Image | None = None

    def set_image(self, image: Image.Image) -> None:
        self.reset()
        self._pending_image = image

    def reset(self) -> None:
        self.messages, self.images, self._pending_image = [], [], None

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        content = text
        images = list(self.images)
        if self._pending_image is not None:
            content = f"{IMAGE_PLACEHOLDER}\n{text}"
            images.append(self._pending_image)
        messages = [*self.messages, {"role": "user", "content": content}]
        request = GenerationRequest(messages=messages, images=images, params=self.params)
        callback = (lambda _row, delta: on_text(delta)) if on_text else None
        result = self.generator.generate([request], on_text=callback)[0]
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        self.images = images
        self._pending_image = None
        return result
