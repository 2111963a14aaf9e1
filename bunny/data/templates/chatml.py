"""`chatml`: Qwen's official ChatML format (Qwen1.5 / Qwen2 / Qwen2.5 chat models)::

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n

Default system prompt "You are a helpful assistant." (Qwen2's template). The reply and
``<|im_end|>`` are learned; the newline after ``<|im_end|>`` is not (generation stops at the end
token, so that newline is never generated). Qwen adds no BOS.
"""

from __future__ import annotations

from bunny.data.templates.base import TEMPLATES, ChatTemplate


class ChatMLTemplate(ChatTemplate):
    name = "chatml"
    default_system = "You are a helpful assistant."
    end_token = "<|im_end|>"
    extra_stop_strings = ("<|endoftext|>",)
    special_tokens = ("<|im_start|>", "<|im_end|>")

    def system_text(self, system: str) -> str:
        return "<|im_start|>system\n" + system + "<|im_end|>\n"

    def user_text(self, content: str) -> str:
        return "<|im_start|>user\n" + content + "<|im_end|>\n"

    @property
    def generation_prefix(self) -> str:
        return "<|im_start|>assistant\n"

    @property
    def after_reply(self) -> str:
        return "\n"


TEMPLATES.register("chatml", ChatMLTemplate())
