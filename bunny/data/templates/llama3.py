"""`llama3`: Meta-Llama-3-Instruct's official format, and `bunny-llama3`: what Bunny trained.

Official (``<|begin_of_text|>`` is the BOS the Llama-3 tokenizer adds itself)::

    <|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>

(no newlines between turns). The reply and ``<|eot_id|>`` are learned. No default system prompt
(Llama 3's own template has none). Content is not ``trim``-med as Meta's Jinja template does:
the data is trained as written.

Bunny-Llama-3-8B-V did *not* use this format: the original repo's ``llama`` conversation mode is
the Bunny format (``USER: ... ASSISTANT: ...``) with the BOS and ``<|end_of_text|>`` (not
``<|eot_id|>``) as the end of each reply (``conv_llama``, ``sep2="<|end_of_text|>"``). That is
``bunny-llama3`` here; use it to reproduce or continue the released Llama-3 Bunny models.
"""

from __future__ import annotations

from bunny.data.templates.base import TEMPLATES, ChatTemplate
from bunny.data.templates.bunny import BunnyTemplate


class Llama3Template(ChatTemplate):
    name = "llama3"
    end_token = "<|eot_id|>"
    extra_stop_strings = ("<|end_of_text|>",)
    special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    @staticmethod
    def _header(role: str) -> str:
        return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"

    def system_text(self, system: str) -> str:
        return self._header("system") + system + "<|eot_id|>"

    def user_text(self, content: str) -> str:
        return self._header("user") + content + "<|eot_id|>"

    @property
    def generation_prefix(self) -> str:
        return self._header("assistant")


TEMPLATES.register("llama3", Llama3Template())
TEMPLATES.register("bunny-llama3", BunnyTemplate("bunny-llama3", end_token="<|end_of_text|>"))
