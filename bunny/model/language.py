"""LLM families: which transformers class and chat template each LLM uses.

One registry entry per family (``LLM_FAMILIES``); exact names, no substring matching. The template
names refer to ``bunny.data.templates.TEMPLATES``.

| family      | transformers class     | config model_type | template |
|-------------|------------------------|-------------------|----------|
| phi-1.5     | PhiForCausalLM         | phi               | bunny    |
| phi-2       | PhiForCausalLM         | phi               | bunny    |
| phi-3       | Phi3ForCausalLM        | phi3              | phi3     |
| stablelm-2  | StableLmForCausalLM    | stablelm          | bunny    |
| qwen1.5     | Qwen2ForCausalLM       | qwen2             | bunny    |
| qwen2       | Qwen2ForCausalLM       | qwen2             | chatml   |
| minicpm     | MiniCPMForCausalLM (*) | minicpm           | minicpm  |
| llama-3     | LlamaForCausalLM       | llama             | llama3   |
| smollm2     | LlamaForCausalLM       | llama             | chatml   |
| generic     | AutoModelForCausalLM   | any               | bunny    |

The end-of-turn token is the template's (``bunny.data.templates``: one source of truth), plus the
tokenizer's eos (``bunny.model.generation``).

(*) our own port (``bunny.model.minicpm``): transformers has no MiniCPM-1/2 class and the hub code
needs ``trust_remote_code``; with the port a MiniCPM-2B folder loads offline without it.
``qwen2`` also serves Qwen2.5 (same architecture) and uses ChatML because the Qwen2/2.5 instruct models
were trained on it; ``qwen1.5`` keeps Bunny's own template as the released Bunny-Qwen1.5 models did.
``smollm2`` (HF's SmolLM2, the LLM of nanoVLM; often at hand as a ``.gguf`` file, see
``bunny.model.gguf``) is Llama with ChatML: name it explicitly, a ``llama`` config defaults to ``llama-3``.
``generic`` loads any other ``AutoModelForCausalLM`` folder; a folder's own Python code runs only when the
user turns on the ``trust_remote_code`` flag (``--trust-remote-code``; off by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from bunny.model.minicpm import MiniCPMForCausalLM  # importing it registers minicpm with AutoConfig
from bunny.registry import Registry


@dataclass(frozen=True)
class LLMFamily:
    name: str
    #: transformers causal-LM class name (looked up in ``transformers`` or ``bunny.model.minicpm``);
    #: None means ``AutoModelForCausalLM`` (the generic entry)
    class_name: str | None
    #: config ``model_type`` values this family accepts (empty: any)
    model_types: tuple[str, ...]
    #: ``TEMPLATES`` name the family's models were trained with
    chat_template: str

    def model_class(self) -> type[PreTrainedModel]:
        if self.class_name is None:
            return AutoModelForCausalLM  # type: ignore[return-value]
        if self.class_name == "MiniCPMForCausalLM":
            return MiniCPMForCausalLM
        return getattr(transformers, self.class_name)

    def check_config(self, config: PretrainedConfig) -> None:
        if self.model_types and config.model_type not in self.model_types:
            raise ValueError(
                f"LLM family {self.name!r} expects a config of model_type {' or '.join(self.model_types)}, "
                f"got {config.model_type!r}; pick another family or 'generic'"
            )

    def build(self, text_config: PretrainedConfig) -> PreTrainedModel:
        """A freshly initialised causal LM for ``text_config``."""
        self.check_config(text_config)
        if self.class_name is None:
            return AutoModelForCausalLM.from_config(text_config)
        return self.model_class()._from_config(text_config)

    def from_pretrained(
        self,
        path: str | Path,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> PreTrainedModel:
        """Load the causal LM of a local HF folder (weights included)."""
        config = load_text_config(path, trust_remote_code=trust_remote_code)
        self.check_config(config)
        cls = AutoModelForCausalLM if self.class_name is None else self.model_class()
        return cls.from_pretrained(
            str(path), config=config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )


LLM_FAMILIES: Registry[LLMFamily] = Registry("LLM family")

for _family in (
    LLMFamily("phi-1.5", "PhiForCausalLM", ("phi",), "bunny"),
    LLMFamily("phi-2", "PhiForCausalLM", ("phi",), "bunny"),
    LLMFamily("phi-3", "Phi3ForCausalLM", ("phi3",), "phi3"),
    LLMFamily("stablelm-2", "StableLmForCausalLM", ("stablelm",), "bunny"),
    LLMFamily("qwen1.5", "Qwen2ForCausalLM", ("qwen2",), "bunny"),
    LLMFamily("qwen2", "Qwen2ForCausalLM", ("qwen2",), "chatml"),
    LLMFamily("minicpm", "MiniCPMForCausalLM", ("minicpm",), "minicpm"),
    LLMFamily("llama-3", "LlamaForCausalLM", ("llama",), "llama3"),
    LLMFamily("smollm2", "LlamaForCausalLM", ("llama",), "chatml"),
    LLMFamily("generic", None, (), "bunny"),
):
    LLM_FAMILIES.register(_family.name, _family)

#: the family picked for a config ``model_type`` when the user names none
DEFAULT_FAMILY_FOR_MODEL_TYPE = {
    "phi": "phi-2",
    "phi3": "phi-3",
    "stablelm": "stablelm-2",
    "qwen2": "qwen2",
    "minicpm": "minicpm",
    "llama": "llama-3",
}


def family_for_config(config: PretrainedConfig) -> str:
    """The default family for a text config (``generic`` for an architecture we have no entry for)."""
    return DEFAULT_FAMILY_FOR_MODEL_TYPE.get(config.model_type, "generic")


def load_text_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The causal-LM config of a local folder. MiniCPM folders resolve to our port (``import bunny``
    registers it), so they need no remote code."""
    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def text_config_from_dict(raw: dict) -> PretrainedConfig:
    """Deserialise a text sub-config by its ``model_type`` (transformers' CONFIG_MAPPING + our ports)."""
    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ValueError("text_config has no model_type")
    return AutoConfig.for_model(model_type, **raw)
