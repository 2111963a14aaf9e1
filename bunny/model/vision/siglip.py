"""SigLIP (e.g. google/siglip-so400m-patch14-384): all patch tokens of the second-to-last block.

SigLIP has no CLS token, so ``patch`` and ``full`` select the same 27x27 = 729 tokens at 384 px.
Weights: a bare ``SiglipVisionModel`` folder (transformers 5 keys have no prefix, 4.x keys start with
``vision_model.``) or a full ``SiglipModel`` folder (``vision_model.*`` + ``text_model.*``: the text
tower is dropped).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from bunny.model.vision.base import VISION_ENCODERS, VisionEncoder


@VISION_ENCODERS.register("siglip")
class SiglipEncoder(VisionEncoder):
    config_class = SiglipVisionConfig
    num_prefix_tokens = 0
    config_model_types = ("siglip", "siglip_vision_model")
    default_feature_select = "full"
    default_image_mean = (0.5, 0.5, 0.5)
    default_image_std = (0.5, 0.5, 0.5)

    def build(self, vision_config: SiglipVisionConfig) -> None:
        self.vision_tower = SiglipVisionModel(vision_config)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.embeddings(pixel_values)

    def blocks(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers
