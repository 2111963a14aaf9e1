"""`bunny`: the template of the original Bunny repo (``conv_bunny``, ``SeparatorStyle.TWO``).

Rendered (checked against BAAI-DCAI/Bunny ``bunny/conversation.py``)::

    {system} USER: {q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>

``sep`` is one space, ``sep2`` the end token, which is followed directly by the next ``USER:``
(no space). The generation prompt ends with ``ASSISTANT:`` (no trailing space), so the reply's
first token carries its leading space (`` The``), as in the original, where that token is learned.
The BOS is whatever the tokenizer adds by default (none for Phi-2/Qwen; ``<|begin_of_text|>`` /
``<s>`` for Llama-3 / MiniCPM, matching the original's ``preprocess_bunny_with_bos``).

Variants with the end tokens the original used for other LLMs are registered in ``llama3.py``
(``bunny-llama3``) and ``minicpm.py`` (``bunny-minicpm``). Bunny's ``phi3`` conversation mode is
identical to ``bunny`` (``<|endoftext|>``).
"""

from __future__ import annotations

from bunny.data.templates.base import TEMPLATES, ChatTemplate

BUNNY_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class BunnyTemplate(ChatTemplate):
    default_system = BUNNY_SYSTEM

    def __init__(self, name: str = "bunny", end_token: str = "<|endoftext|>") -> None:
        self.name = name
        self.end_token = end_token
        self.special_tokens = (end_token,)  # the roles are plain text ("USER: ", "ASSISTANT:")

    def system_text(self, system: str) -> str:
        return system + " " if system else ""

    def user_text(self, content: str) -> str:
        return "USER: " + content + " "

    @property
    def generation_prefix(self) -> str:
        return "ASSISTANT:"

    def reply_text(self, content: str) -> str:
        return " " + content


TEMPLATES.register("bunny", BunnyTemplate())
