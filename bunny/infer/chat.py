"""A multi-turn, multi-image chat session over one Generator: the state behind ``bunny chat`` and
the web page."""

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
    """Keeps the conversation and its images; images added are attached to the next user turn.

    A conversation may hold several images (Bunny trains on several per conversation): adding one
    mid-conversation continues it, with every earlier turn and image still in the prompt, as the
    OpenAI API does with a longer ``messages`` list. ``reset`` (or ``set_image``) starts over.
    """

    generator: Generator
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending_images: list[Image.Image] = field(default_factory=list)

    def add_image(self, image: Image.Image) -> None:
        """Attach ``image`` to the next question (the conversation goes on)."""
        self.pending_images.append(image)

    def set_image(self, image: Image.Image) -> None:
        """Start a new conversation about ``image``."""
        self.reset()
        self.add_image(image)

    def reset(self) -> None:
        self.messages, self.images, self.pending_images = [], [], []

    def _request(self, text: str) -> GenerationRequest:
        # one placeholder per new image, on its own line before the question (the training data's layout)
        content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in self.pending_images) + text
        messages = [*self.messages, {"role": "user", "content": content}]
        return GenerationRequest(messages=messages, images=[*self.images, *self.pending_images], params=self.params)

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
        self.pending_images = []
        return result
