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

    def _request(self, text: str) -> GenerationRequest:
        content, images = text, list(self.images)
        if self._pending_image is not None:
            content = f"{IMAGE_PLACEHOLDER}\n{text}"
            images.append(self._pending_image)
        messages = [*self.messages, {"role": "user", "content": content}]
        return GenerationRequest(messages=messages, images=images, params=self.params)

    def validate_next(self, text: str) -> int:
        """Check that asking ``text`` next fits the model (ValueError if the conversation outgrew
        the context); returns the prompt length in tokens."""
        return self.generator.validate(self._request(text))

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Answer ``text`` in the conversation (streaming through ``on_text``) and remember both."""
        request = self._request(text)
        self.generator.validate(request)  # ValueError leaves the conversation as it was
        callback = (lambda _row, delta: on_text(delta)) if on_text else None
        result = self.generator.generate([request], on_text=callback)[0]
        self.messages = [*request.messages, {"role": "assistant", "content": result.text}]
        self.images = request.images
        self._pending_image = None
        return result
