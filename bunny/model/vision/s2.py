"""S^2 multi-scale wrapper ("When Do We Not Need Larger Vision Models?", arXiv 2403.13284), over any encoder.

For an encoder of input size ``base`` (e.g. 384) and scales ``(384, 768, 1152)`` the input is the
image at the largest scale (1152 px). For each scale ``s`` the image is resized to ``s`` (the
largest scale is used as it is), cut into ``(s / base)**2`` tiles of ``base`` pixels (row-major),
and every tile of every scale goes through the encoder in ONE batched call. Each scale's tile
feature maps are stitched back into one ``(s / base * g)``-sided map (``g`` = the encoder's patch
grid), area-interpolated (``F.interpolate(mode="area")``, i.e. average pooling) down to ``g x g``,
and the scales are concatenated on channels: ``[B, g*g, C * len(scales)]``.

Resizing follows the public ``s2wrapper`` code that Bunny-v1.1 was trained with:
``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing, computed in float32
and cast back. ``interpolation``/``antialias`` can be changed (e.g. ``antialias=True`` for a
less aliased downscale), at the cost of features that differ from the released models'.

Differences from the original, by design: any encoder whose features form a square patch grid
works (SigLIP, CLIP/EVA with the CLS token dropped, i.e. ``feature_select="patch"``); the output is
always on the encoder's own grid; the scales need not include ``base`` (the original always did).

The wrapper adopts the encoder's submodules under their own names, so its ``state_dict`` keys are
exactly the plain encoder's: a vision tower's weights load the same with and without S^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SCALE_FACTORS = (1, 2, 3)  # 384 -> (384, 768, 1152), as Bunny-v1.1


def default_scales(image_size: int) -> list[int]:
    """The S^2 scales Bunny used, for an encoder of input size ``image_size``."""
    return [image_size * f for f in DEFAULT_SCALE_FACTORS]


class S2Wrapper(nn.Module):
    """``S2Wrapper(encoder, scales)``: the encoder interface (``hidden_size``, ``image_size``,
    ``num_tokens``, ``forward(pixel_values) -> [B, N, C]``) over several scales.

    ``image_size`` is the largest scale (the size the processor must resize to), ``num_tokens`` the
    encoder's own, ``hidden_size`` the encoder's times ``len(scales)`` (channel blocks in ascending
    scale order).
    """

    def __init__(
        self,
        encoder: nn.Module,
        scales: Sequence[int] | None = None,
        interpolation: str = "bicubic",
        antialias: bool = False,
    ) -> None:
        super().__init__()
        base = int(encoder.image_size)
        scales = default_scales(base) if scales is None else [int(s) for s in scales]
        if not scales:
            raise ValueError("S^2 needs at least one scale")
        bad = [s for s in scales if s <= 0 or s % base]
        if bad:
            raise ValueError(f"S^2 scales must be positive multiples of the encoder's image size {base}; got {bad}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"S^2 scales repeat: {scales}")
        grid = math.isqrt(int(encoder.num_tokens))
        if grid * grid != int(encoder.num_tokens):
            raise ValueError(
                f"S^2 needs features on a square patch grid, the encoder gives {encoder.num_tokens} tokens; "
                "build it with feature_select='patch' to drop the CLS token"
            )
        if interpolation not in ("bicubic", "bilinear", "area", "nearest", "nearest-exact"):
            raise ValueError(f"unknown interpolation {interpolation!r}")
        # Adopt the encoder's children (not the encoder itself) so state_dict keys do not change.
        own = list(encoder.named_parameters(recurse=False)) + list(encoder.named_buffers(recurse=False))
        if own:
            raise ValueError(f"S^2 cannot wrap an encoder with direct parameters/buffers: {[n for n, _ in own]}")
        for name, child in encoder.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "encoder", encoder)  # a plain reference, not a registered submodule

        self.scales = sorted(scales)
        self.base_size = base
        self.grid = grid
        self.interpolation = interpolation
        self.antialias = antialias
        self.image_size = self.scales[-1]
        self.num_tokens = grid * grid
        self.hidden_size = int(encoder.hidden_size) * len(self.scales)

    # the encoder's settings, for code that reads them off the vision tower
    @property
    def config(self):
        return self.encoder.config

    @property
    def feature_layer(self) -> int:
        return self.encoder.feature_layer

    @property
    def feature_select(self) -> str:
        return self.encoder.feature_select

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return f"scales={self.scales}, base={self.base_size}, interpolation={self.interpolation}, antialias={self.antialias}"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"S^2 expects images at the largest scale {self.image_size}x{self.image_size}, got {h}x{w}"
            )
        base = self.base_size
        tiles, splits = [], []
        for scale in self.scales:
            x = pixel_values
            if scale != h:
                x = F.interpolate(
                    pixel_values.float(),
                    size=(scale, scale),
                    mode=self.interpolation,
                    align_corners=False if self.interpolation in ("bicubic", "bilinear") else None,
                    antialias=self.antialias,
                ).to(pixel_values.dtype)
            n = scale // base
            # [B, 3, n*base, n*base] -> [n*n*B, 3, base, base], tile (i, j) of image b at (i*n + j)*B + b
            x = x.reshape(b, -1, n, base, n, base).permute(2, 4, 0, 1, 3, 5).reshape(n * n * b, -1, base, base)
            tiles.append(x)
            splits.append(n * n * b)
        features = self.encoder(torch.cat(tiles))  # one batched call: [sum(n*n*B), g*g, C]

        g = self.grid
        maps = []
        for scale, f in zip(self.scales, features.split(splits)):
            n = scale // base
            c = f.shape[-1]
            # [n*n*B, g*g, C] -> [B, C, n*g, n*g]: tile (i, j) covers rows i*g.., columns j*g..
            f = f.reshape(n, n, b, g, g, c).permute(2, 5, 0, 3, 1, 4).reshape(b, c, n * g, n * g)
            if n > 1:
                f = F.interpolate(f.float(), size=(g, g), mode="area").to(features.dtype)
            maps.append(f)
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
