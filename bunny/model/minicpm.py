"""MiniCPM-1/2 (e.g. openbmb/MiniCPM-2B) as a small port on top of transformers' Llama.

transformers has no class for these models (``minicpm3`` is a different architecture) and the hub
ships them as remote code. MiniCPM is Llama with three muP scalings:

* input embeddings are multiplied by ``scale_emb``;
* each residual branch (attention and MLP) is multiplied by ``scale_depth / sqrt(num_hidden_layers)``;
* the final hidden states are divided by ``hidden_size / dim_model_base`` before ``lm_head``.

Weight names are Llama's (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ...), as in the
released checkpoints, so a MiniCPM-2B folder loads with ``MiniCPMForCausalLM.from_pretrained``, or
with ``AutoModelForCausalLM`` once ``bunny`` is imported, without ``trust_remote_code``.

One deliberate difference from the hub code: ``scale_emb`` is applied to ``inputs_embeds`` too (the
hub code scales only embeddings it looks up itself). Bunny passes spliced text+image embeddings, and
this way text tokens are scaled identically whichever path they take.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


class MiniCPMConfig(LlamaConfig):
    model_type = "minicpm"

    scale_emb: float = 1.0
    dim_model_base: int | None = None
    scale_depth: float = 1.0
    tie_word_embeddings: bool = True

    @property
    def residual_scale(self) -> float:
        return float(self.scale_depth) / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base if self.dim_model_base else 1.0


class MiniCPMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_scale = config.residual_scale

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states * self.residual_scale
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states * self.residual_scale


class MiniCPMPreTrainedModel(LlamaPreTrainedModel):
    config_class = MiniCPMConfig
    config: MiniCPMConfig
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _can_record_outputs = {"hidden_states": MiniCPMDecoderLayer}


class MiniCPMModel(MiniCPMPreTrainedModel, LlamaModel):
    def __init__(self, config: MiniCPMConfig):
        MiniCPMPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return LlamaModel.forward(self, inputs_embeds=inputs_embeds * self.config.scale_emb, **kwargs)


class _ScaledLMHead(nn.Linear):
    """``lm_head`` that first divides the hidden states by ``hidden_size / dim_model_base``.

    Keeping the scaling inside the head (same ``weight`` key, same tying) lets every caller that does
    ``lm_head(hidden)`` -- including transformers' ``logits_to_keep`` slicing -- get MiniCPM's logits.
    """

    def __init__(self, in_features: int, out_features: int, divisor: float):
        super().__init__(in_features, out_features, bias=False)
        self.divisor = divisor

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden / self.divisor)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: MiniCPMConfig):
        MiniCPMPreTrainedModel.__init__(self, config)
        self.model = MiniCPMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = _ScaledLMHead(config.hidden_size, config.vocab_size, config.logit_divisor)
        self.post_init()


def register_minicpm() -> None:
    """Register ``minicpm`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    for register in (
        lambda: AutoConfig.register("minicpm", MiniCPMConfig),
        lambda: AutoModel.register(MiniCPMConfig, MiniCPMModel),
        lambda: AutoModelForCausalLM.register(MiniCPMConfig, MiniCPMForCausalLM),
    ):
        try:
            register()
        except ValueError:  # already registered
            pass


# Registered on import: any module that loads a text config imports this one first.
register_minicpm()
