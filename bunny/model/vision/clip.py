"""CLIP ViT (e.g. openai/clip-vit-large-patch14-336): second-to-last block, CLS dropped (576 tokens).

Weights: a bare ``CLIPVisionModel`` folder (transformers 5 keys have no prefix, 4.x keys start with
``vision_model.``) or a full ``CLIPModel`` folder (the text tower and projections are dropped).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from bunny.model.vision.base import VISION_ENCODERS, VisionEncoder


@VISION_ENCODERS.register("clip")
class ClipEncoder(VisionEncoder):
    config_class = CLIPVisionConfig
    num_prefix_tokens = 1
    config_model_types = ("clip", "clip_vision_model")
    default_feature_select = "patch"

    def build(self, vision_config: CLIPVisionConfig) -> None:
        self.vision_tower = CLIPVisionModel(vision_config)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.pre_layrnorm(self.vision_tower.embeddings(pixel_values))

    def blocks(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers
