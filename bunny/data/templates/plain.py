"""`plain`: the stage-1 (alignment) template of Bunny/LLaVA.

A sample is its image(s) followed by the caption and a newline; the human turn's text (e.g.
"Describe the image briefly.") is dropped, as in Bunny's ``preprocess_plain``. Only the caption
and the newline are learned. No system prompt, no roles. Several turns render as several
image/caption pairs (the original accepts exactly one pair).
"""

from __future__ import annotations

from bunny.data.templates.base import IMAGE_PLACEHOLDER, TEMPLATES, ChatTemplate


class PlainTemplate(ChatTemplate):
    name = "plain"
    end_token = "\n"

    def system_text(self, system: str) -> str:
        return ""

    def user_text(self, content: str) -> str:
        return IMAGE_PLACEHOLDER * content.count(IMAGE_PLACEHOLDER)


TEMPLATES.register("plain", PlainTemplate())
