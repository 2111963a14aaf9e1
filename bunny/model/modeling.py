"""BunnyConfig / BunnyForConditionalGeneration: vision encoder -> projector -> causal LM.

One readable file in the style of transformers' ``modeling_llava.py``. The processor expands every
``<image>`` in the text into ``config.num_image_tokens`` copies of ``config.image_token_id``; the model
encodes ``pixel_values`` (every image of the batch, in order of appearance), projects them, and writes
them into the token embeddings at those positions. Image token ids are replaced by id 0 before the
embedding lookup, so ``image_token_id`` may lie beyond the LLM's vocabulary (no embedding resize).

Submodules (state-dict prefixes): ``vision_tower`` (the encoder, its transformers model under
``vision_tower.vision_tower``), ``mm_projector``, ``language_model`` (the family's causal LM, keys
``language_model.model.*`` and ``language_model.lm_head.*``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from bunny.data.templates import IGNORE_INDEX
from bunny.model.fused import cross_entropy_sum
from bunny.model.language import LLM_FAMILIES, family_for_config, text_config_from_dict
from bunny.model.projectors import build_projector, projector_num_tokens
from bunny.model.vision import FEATURE_SELECTS, VISION_ENCODERS, build_vision_encoder

IMAGE_MODES = ("pad", "square")


class BunnyConfig(PreTrainedConfig):
    r"""Configuration of a Bunny model.

    Args:
        vision_config: the encoder's own transformers config (or its dict; the class is resolved
            from ``vision_encoder`` through ``VISION_ENCODERS``).
        text_config: any causal-LM config (or its dict; resolved by its ``model_type``).
        vision_encoder: registry name: ``siglip``, ``clip``, ``eva_clip``.
        vision_feature_layer: which hidden state of the encoder (-2: second-to-last block).
        vision_feature_select: ``patch`` drops the CLS token, ``full`` keeps every token
            (default: the encoder's own default: ``full`` for SigLIP, ``patch`` otherwise).
        s2_scales: multi-scale S^2 input sizes (e.g. ``[384, 768, 1152]``), or None.
        projector_type: ``linear``, ``mlp{N}x_gelu``, ``identity``, ``avgpool2x2_mlp2x_gelu``, ...
        image_aspect_ratio: ``pad`` (mean-colour square padding) or ``square`` (plain resize).
        image_token_id: the id the processor writes for each image token (default: the LLM's
            vocab size, i.e. the first id beyond the vocabulary).
        llm_family: ``LLM_FAMILIES`` name (default: derived from the text config's model_type).
        chat_template: ``TEMPLATES`` name (default: the family's).
    """

    model_type = "bunny"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_encoder: str = "siglip"
    vision_feature_layer: int = -2
    vision_feature_select: str | None = None
    s2_scales: list[int] | None = None
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    image_token_id: int | None = None
    llm_family: str | None = None
    chat_template: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        encoder_cls = VISION_ENCODERS.get(self.vision_encoder)
        if isinstance(self.vision_config, dict):
            raw = {k: v for k, v in self.vision_config.items() if k != "model_type"}
            self.vision_config = encoder_cls.config_class(**raw)
        elif self.vision_config is None:
            self.vision_config = encoder_cls.config_class()
        if isinstance(self.text_config, dict) and "model_type" in self.text_config:
            self.text_config = text_config_from_dict(self.text_config)
        super().__post_init__(**kwargs)

        if self.vision_feature_select is None:
            self.vision_feature_select = encoder_cls.default_feature_select
        if self.vision_feature_select not in FEATURE_SELECTS:
            raise ValueError(f"vision_feature_select must be one of {FEATURE_SELECTS}, got {self.vision_feature_select!r}")
        if self.image_aspect_ratio not in IMAGE_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_MODES}, got {self.image_aspect_ratio!r}")
        if self.s2_scales is not None:
            self.s2_scales = [int(s) for s in self.s2_scales]
        if self.llm_family is None:
            self.llm_family = family_for_config(self.text_config)
        family = LLM_FAMILIES.get(self.llm_family)
        if self.chat_template is None:
            self.chat_template = family.chat_template
        if self.image_token_id is None:
            self.image_token_id = int(self.text_config.vocab_size)
        # The text config decides tying (phi-1.5, minicpm, qwen2 small models tie their embeddings).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes in the LLM sequence (encoder tokens through the projector)."""
        encoder_cls = VISION_ENCODERS.get(self.vision_encoder)
        n = encoder_cls.count_tokens(self.vision_config, self.vision_feature_select)
        return projector_num_tokens(self, n)

    @property
    def image_size(self) -> int:
        """The side of the square the processor resizes images to (the largest S^2 scale)."""
        return int(max(self.s2_scales)) if self.s2_scales else int(self.vision_config.image_size)


class BunnyPreTrainedModel(PreTrainedModel):
    config_class = BunnyConfig
    config: BunnyConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the image/placeholder count check is data dependent
    _skip_keys_device_placement = ["cache", "past_key_values"]


class BunnyForConditionalGeneration(BunnyPreTrainedModel, GenerationMixin):
    """Bunny: ``vision_tower`` -> ``mm_projector`` -> ``language_model``.

    ``language_model`` / ``vision_tower`` may be passed already built (e.g. loaded from pretrained
    folders by ``bunny.model.assemble``); otherwise they are built from the config.
    """

    fused_loss: bool = False
    """Training's supervised-logits loss through the compiled cross-entropy (bunny/model/fused.py); set by
    the trainer with ``fused_elementwise``, never saved."""

    def __init__(
        self,
        config: BunnyConfig,
        language_model: PreTrainedModel | None = None,
        vision_tower: nn.Module | None = None,
    ):
        super().__init__(config)
        for given in (language_model, vision_tower):
            if given is not None:  # already built/loaded: post_init() must not re-initialise its weights
                for module in given.modules():
                    module._is_hf_initialized = True
        self.vision_tower = vision_tower or build_vision_encoder(
            config.vision_encoder,
            config.vision_config,
            feature_layer=config.vision_feature_layer,
            feature_select=config.vision_feature_select,
            s2_scales=config.s2_scales,
        )
        self.mm_projector = build_projector(config, self.vision_tower.hidden_size)
        family = LLM_FAMILIES.get(config.llm_family)
        self.language_model = language_model if language_model is not None else family.build(config.text_config)
        count = getattr(self.mm_projector, "num_output_tokens", None)  # projectors that can count check it
        built_tokens = count(self.vision_tower.num_tokens) if count is not None else config.num_image_tokens
        if built_tokens != config.num_image_tokens:
            raise ValueError(
                f"the built vision tower + projector give {built_tokens} tokens per image but the config "
                f"says {config.num_image_tokens}"
            )
        self.post_init()

    # -- transformers plumbing -----------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # -- images --------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_images, 3, H, W] -> projected features [n_images, num_image_tokens, D]."""
        return self.mm_projector(self.vision_tower(pixel_values))

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        allow_unfilled: bool = False,
    ) -> torch.Tensor:
        """Token embeddings with the image features written at the image-token positions.

        ``image_features`` (already projected, [n_images, T, D]) may replace ``pixel_values``, e.g.
        from a feature cache. ``allow_unfilled`` tolerates image ids with no images (decode steps).
        """
        image_mask = input_ids == self.config.image_token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if image_features is None and pixel_values is not None and pixel_values.numel() > 0:
            image_features = self.get_image_features(pixel_values)
        n_positions = int(image_mask.sum())
        if image_features is None:
            if n_positions and not allow_unfilled:
                raise ValueError(
                    f"input_ids hold {n_positions} image-token positions but no images were given "
                    f"(pixel_values is None)"
                )
            return embeds
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_positions != n_features:
            raise ValueError(
                f"input_ids hold {n_positions} image-token positions but the images give {n_features} "
                f"features ({image_features.shape[0]} images x {image_features.shape[1]} tokens); each "
                f"<image> must be expanded to {self.config.num_image_tokens} tokens, one <image> per image"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(embeds.dtype))

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features: torch.Tensor | None = None,
        supervised_logits_only: bool = False,
        loss_chunk_size: int | None = None,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""Standard causal-LM forward with images.

        ``labels``: next-token targets (shifted inside, ``-100`` ignored; image positions are always
        ignored). ``supervised_logits_only=True`` (training): logits are computed only at positions
        whose next token is supervised, so the full-vocabulary logits are never materialised for
        prompt/image tokens; the returned ``logits`` are then ``[n_supervised, vocab]`` and the
        loss equals the default one. ``num_items_in_batch`` (in kwargs) turns the mean into a sum
        divided by it, as in transformers' loss (gradient accumulation). ``loss_chunk_size`` (with
        ``supervised_logits_only``): the head and the loss run over that many positions at a time and
        are recomputed in backward, so the ``[n_supervised, vocab]`` logits never exist whole (a
        49k vocabulary x 3k targets is 0.6 GB in float32, several times over with softmax and
        gradients); the returned ``logits`` are then None.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            decoding = cache is not None and cache.get_seq_length() > 0
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values=pixel_values, image_features=image_features, allow_unfilled=decoding
            )
        elif pixel_values is not None or image_features is not None:
            raise ValueError("images need input_ids (their image-token positions); got inputs_embeds")

        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)

        lm_kwargs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        if labels is not None and supervised_logits_only:
            num_items_in_batch = lm_kwargs.pop("num_items_in_batch", None)
            targets = labels[:, 1:]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != IGNORE_INDEX
            wanted = targets[targets != IGNORE_INDEX]
            if loss_chunk_size and self.config.llm_family != "generic":
                # decoder, then the head chunk by chunk: only one chunk's logits exist at a time
                out = self.language_model.get_decoder()(**lm_kwargs)
                hidden = out.last_hidden_state[keep]
                logits = None
                loss = chunked_head_loss(hidden, wanted.to(hidden.device), self.get_output_embeddings(),
                                         loss_chunk_size, self.fused_loss)
            else:
                out = self.language_model(logits_to_keep=keep, **lm_kwargs)
                logits = out.logits.reshape(-1, out.logits.shape[-1])
                loss = cross_entropy_sum(logits, wanted.to(logits.device), self.fused_loss)
            denominator = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
            if torch.is_tensor(denominator):
                denominator = denominator.to(loss.device)
            loss = loss / denominator
            if int(keep.sum()) == 0 and logits is not None:
                loss = loss + 0.0 * logits.sum()  # keep the graph connected
        else:
            out = self.language_model(labels=labels, logits_to_keep=logits_to_keep, **lm_kwargs)
            logits, loss = out.logits, out.loss

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=getattr(out, "cache", None) if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


def chunked_head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int,
                      fused: bool = False) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, ``chunk`` rows at a time. Each
    chunk is checkpointed: its logits are freed after its loss and recomputed in backward, so memory
    holds one chunk's logits instead of all of them (one extra head matmul is the price)."""
    from torch.utils.checkpoint import checkpoint

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(head(h), t, fused)

    total = None
    for start in range(0, max(int(hidden.shape[0]), 1), chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        piece = checkpoint(part, h, t, use_reentrant=False) if h.requires_grad else part(h, t)
        total = piece if total is None else total + piece
    return total


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` know ``bunny``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        AutoConfig.register("bunny", BunnyConfig)
    except ValueError:  # already registered (re-import)
        pass
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            auto.register(BunnyConfig, BunnyForConditionalGeneration)
        except ValueError:
            pass
