"""`minicpm`: MiniCPM-2B-sft's official format, and `bunny-minicpm`: what Bunny trained.

Official (MiniCPM's tokenizer adds the ``<s>`` BOS)::

    {system}<用户>{q}<AI>{a}</s><用户>{q2}<AI>{a2}</s>

MiniCPM's chat template writes a system message as bare text before the first ``<用户>`` and
``strip()``-s every message; here content is kept as written. The reply and ``</s>`` (the eos,
which MiniCPM's fine-tuning script appends to each reply) are learned. No default system prompt.

Bunny's MiniCPM model used the Bunny format with the BOS and ``</s>`` as the end of each reply
(``conv_minicpm``): that is ``bunny-minicpm``.
"""

from __future__ import annotations

from bunny.data.templates.base import TEMPLATES, ChatTemplate
from bunny.data.templates.bunny import BunnyTemplate


class MiniCPMTemplate(ChatTemplate):
    name = "minicpm"
    end_token = "</s>"
    special_tokens = ("<用户>", "<AI>", "</s>")

    def system_text(self, system: str) -> str:
        return system

    def user_text(self, content: str) -> str:
        return "<用户>" + content

    @property
    def generation_prefix(self) -> str:
        return "<AI>"


TEMPLATES.register("minicpm", MiniCPMTemplate())
TEMPLATES.register("bunny-minicpm", BunnyTemplate("bunny-minicpm", end_token="</s>"))
