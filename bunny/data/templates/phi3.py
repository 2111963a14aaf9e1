"""`phi3`: Phi-3-mini-instruct's official format::

    <|system|>\n{system}<|end|>\n<|user|>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n

The reply and ``<|end|>`` are learned, the newline after it is not. No default system prompt.
The BOS is the tokenizer's default.

Bunny's Phi-3 models (Bunny-v1.0/1.1-4B, ``--version phi3``) used the Bunny format with
``<|endoftext|>`` (the original ``conv_phi3`` equals ``conv_bunny``): use the `bunny` template to
reproduce or continue those.
"""

from __future__ import annotations

from bunny.data.templates.base import TEMPLATES, ChatTemplate


class Phi3Template(ChatTemplate):
    name = "phi3"
    end_token = "<|end|>"
    extra_stop_strings = ("<|endoftext|>",)
    special_tokens = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

    def system_text(self, system: str) -> str:
        return "<|system|>\n" + system + "<|end|>\n"

    def user_text(self, content: str) -> str:
        return "<|user|>\n" + content + "<|end|>\n"

    @property
    def generation_prefix(self) -> str:
        return "<|assistant|>\n"

    @property
    def after_reply(self) -> str:
        return "\n"


TEMPLATES.register("phi3", Phi3Template())
