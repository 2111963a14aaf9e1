"""Image decoding and preprocessing: guarded decode, pad-to-square, resize, normalise (PIL + NumPy).

Why here and not in each encoder: training, curation, evaluation and serving must all see the
same pixels for the same file, and all need the same guards (a decompression bomb or a truncated
JPEG must be a clear error naming the file, never a crash mid-epoch or a silently grey image).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

# 8,192 x 8,192: far above any encoder input (S^2's largest scale is 1,152), far below a bomb.
DEFAULT_MAX_PIXELS = 8192 * 8192

ImageSource = str | Path | bytes | Image.Image


class ImageError(ValueError):
    """An image could not be used; the message names the source and the reason."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size}>"
    return str(source)


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (path, bytes or PIL image) fully into an RGB image.

    Checks the header's size before decoding (bomb guard) and forces a full decode so truncated
    files fail here, with the file named, instead of later inside a data-loader worker.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        except OSError as exc:
            raise ImageError(f"{name}: cannot open image: {exc.strerror or exc}") from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{name}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
                if w == 0 or h == 0:
                    raise ImageError(f"{name}: image has zero size")
                img.load()
        except ImageError:
            fp.close()
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            fp.close()
            raise ImageError(f"{name}: cannot decode image: {exc}") from exc
        fp.close()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white rather than whatever colour the file stored under alpha 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The processor's mean colour as 0-255 RGB: the padding colour of the `pad` mode.

    Truncated with ``int()``, not rounded, because that is what the original Bunny/LLaVA code
    (``tuple(int(x * 255) for x in image_mean)``) did when the released models were trained: SigLIP's
    mean 0.5 pads with 127, not 128.
    """
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad ``img`` to a centred square with colour ``fill`` (Bunny/LLaVA's `pad` mode)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(
    img: Image.Image,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    mode: Literal["pad", "square"] = "pad",
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """RGB image -> normalised float32 array [3, H, W].

    `square` resizes directly (stage-1 pretraining); `pad` first pads to a square with the mean
    colour so the aspect ratio survives (fine-tuning and evaluation), as in Bunny.
    """
    if mode not in ("pad", "square"):
        raise ValueError(f"image mode must be 'pad' or 'square', got {mode!r}")
    if img.mode != "RGB":
        img = load_image(img)
    if mode == "pad":
        img = expand_to_square(img, mean_fill(mean))
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if img.size != (hw[1], hw[0]):
        img = img.resize((hw[1], hw[0]), resample=resample)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
