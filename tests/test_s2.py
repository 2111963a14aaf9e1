"""S^2 multi-scale wrapper over every registered encoder: shape, hand-computed tile stitch, 1 scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, SiglipVisionConfig

from bunny.model.vision import VISION_ENCODERS
from bunny.model.vision.eva_clip import EvaVisionConfig
from bunny.model.vision.s2 import S2Wrapper, default_scales

BASE = 28  # tiny encoders: 28 px, patch 7 -> 4x4 grid
SCALES = [28, 56, 84]
TINY = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=BASE, patch_size=7)
CONFIGS = {
    "siglip": lambda: SiglipVisionConfig(**TINY),
    "clip": lambda: CLIPVisionConfig(**TINY),
    "eva_clip": lambda: EvaVisionConfig(**TINY, projection_dim=8),
}


def encoder(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    enc = VISION_ENCODERS.get(name)(CONFIGS[name](), feature_select="patch", **kwargs).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def image(size: int = 84, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def hand_stitched(enc, x: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """The S^2 recipe written out: per scale resize (bicubic, float32), per tile encode alone,
    place the tile's feature map into the scale's grid, area-interpolate to the base grid, concat."""
    b = x.shape[0]
    g = BASE // 7
    per_scale = []
    for scale in scales:
        xs = F.interpolate(x.float(), size=(scale, scale), mode="bicubic", align_corners=False)
        n = scale // BASE
        canvas = torch.zeros(b, n * g, n * g, enc.hidden_size)
        for i in range(n):
            for j in range(n):
                tile = xs[:, :, i * BASE : (i + 1) * BASE, j * BASE : (j + 1) * BASE]
                feat = enc(tile).reshape(b, g, g, -1)  # row-major patch tokens
                canvas[:, i * g : (i + 1) * g, j * g : (j + 1) * g] = feat
        fmap = canvas.permute(0, 3, 1, 2)  # [B, C, n*g, n*g]
        per_scale.append(F.interpolate(fmap, size=(g, g), mode="area"))
    return torch.cat(per_scale, dim=1).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_and_interface(name):
    enc = encoder(name)
    s2 = S2Wrapper(enc, SCALES)
    assert (s2.image_size, s2.num_tokens, s2.hidden_size) == (84, 16, 16 * 3)
    assert s2(image()).shape == (2, 16, 48)
    assert s2.config is enc.config and s2.feature_layer == -2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_equals_hand_computed_tile_stitch(name):
    enc = encoder(name, seed=1)
    x = image()
    out = S2Wrapper(enc, SCALES)(x)
    torch.testing.assert_close(out, hand_stitched(enc, x, SCALES), atol=1e-6, rtol=1e-6)


def test_unsorted_and_partial_scales():
    enc = encoder("eva_clip", seed=2)
    x = image(size=84)
    out = S2Wrapper(enc, [84, 28])(x)  # sorted ascending: channel blocks are [28 | 84]
    torch.testing.assert_close(out, hand_stitched(enc, x, [28, 84]), atol=1e-6, rtol=1e-6)
    no_base = S2Wrapper(enc, [56, 84])  # the base scale is optional; the output stays on the base grid
    assert no_base(x).shape == (2, 16, 32)


def test_all_tiles_go_through_one_encoder_call():
    enc = encoder("siglip")
    s2 = S2Wrapper(enc, SCALES)
    batches = []
    enc.register_forward_hook(lambda _m, args, _o: batches.append(args[0].shape[0]))
    s2(image(batch=3))
    assert batches == [3 * (1 + 4 + 9)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_scale_equals_the_plain_encoder(name):
    enc = encoder(name, seed=3)
    x = image(size=BASE)
    assert torch.equal(S2Wrapper(enc, [BASE])(x), enc(x))


def test_state_dict_is_the_plain_encoders():
    enc = encoder("clip")
    s2 = S2Wrapper(enc, SCALES)
    assert list(s2.state_dict()) == list(enc.state_dict())
    other = encoder("clip", seed=9)
    s2.load_state_dict(other.state_dict())  # loads into the shared modules
    assert torch.equal(enc(image(size=BASE)), other(image(size=BASE)))
    s2.to(torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and s2(image()).dtype == torch.bfloat16


def test_default_scales_and_validation():
    assert default_scales(384) == [384, 768, 1152]
    enc = encoder("siglip")
    assert S2Wrapper(enc).scales == [28, 56, 84]
    with pytest.raises(ValueError, match="multiples"):
        S2Wrapper(enc, [28, 42])
    with pytest.raises(ValueError, match="repeat"):
        S2Wrapper(enc, [28, 28])
    with pytest.raises(ValueError, match="largest scale"):
        S2Wrapper(enc, SCALES)(image(size=56))
    full = VISION_ENCODERS.get("clip")(CONFIGS["clip"](), feature_select="full")
    with pytest.raises(ValueError, match="feature_select='patch'"):
        S2Wrapper(full, SCALES)


def test_antialias_option_changes_only_the_downscaled_scales():
    enc = encoder("eva_clip", seed=4)
    x = image()
    plain = S2Wrapper(enc, SCALES)(x)
    smooth = S2Wrapper(enc, SCALES, antialias=True)(x)
    c = enc.hidden_size
    assert not torch.allclose(plain[..., :c], smooth[..., :c])
    assert torch.equal(plain[..., 2 * c :], smooth[..., 2 * c :])  # the largest scale is not resized
