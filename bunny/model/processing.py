"""BunnyProcessor: one callable that turns prompts + images into ``model(**inputs)`` inputs.

Why one object: the number of tokens an image becomes, the image-token id, the BOS handling and the
pixel preprocessing must agree exactly between training, evaluation and serving. The processor is
the single place that knows all four:

* each ``<image>`` in a text becomes ``num_image_tokens`` copies of ``image_token_id``;
* text is tokenized piece by piece around the placeholders with the chat templates' own helper
  (``bunny.data.templates``), so ``processor(text=[template.render(msgs)])`` gives exactly the ids
  of ``template.encode_prompt(msgs, ...)``: the BOS the tokenizer adds by default comes first
  (``render()`` itself has none), then the text;
* a batch is padded on ``tokenizer.padding_side`` (left for generation);
* images go through ``bunny.data.images`` (``pad``: mean-colour square padding, ``square``: plain
  resize), normalised with the vision checkpoint's mean/std.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

from bunny.data.images import ImageSource, load_image, preprocess
from bunny.data.templates import IMAGE_PLACEHOLDER, Segment, encode_segments, get_template, tokenizer_facts
from bunny.model.modeling import IMAGE_MODES, BunnyConfig
from bunny.model.vision import VISION_ENCODERS

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# PIL's resampling filter numbers, as transformers writes them in preprocessor_config.json
BICUBIC = int(Image.Resampling.BICUBIC)


class BunnyImageProcessor:
    """Images -> ``pixel_values`` [N, 3, size, size] (float32), Bunny's ``pad``/``square`` modes.

    ``size`` is the model's input side (for S^2 the largest scale); ``image_mean``/``image_std``
    come from the vision checkpoint's ``preprocessor_config.json``.
    """

    def __init__(
        self,
        size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_aspect_ratio: str = "pad",
        resample: int = BICUBIC,
    ) -> None:
        if image_aspect_ratio not in IMAGE_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_MODES}, got {image_aspect_ratio!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values, got {list(image_mean)} / {list(image_std)}")
        self.size = int(size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.image_aspect_ratio = image_aspect_ratio
        self.resample = int(resample)

    def preprocess_one(self, image: ImageSource | np.ndarray, mode: str | None = None) -> np.ndarray:
        """One image (path, bytes, PIL image or HWC uint8 array) -> float32 [3, size, size]."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        img = load_image(image)
        return preprocess(img, self.size, self.image_mean, self.image_std,
                          mode=mode or self.image_aspect_ratio, resample=self.resample)

    def __call__(self, images: Any, return_tensors: str | None = "pt", image_aspect_ratio: str | None = None,
                 **_: Any) -> BatchFeature:
        """``images``: one image or a (nested) list of them -> ``{"pixel_values"}``."""
        flat = flatten_images(images)
        arrays = [self.preprocess_one(img, image_aspect_ratio) for img in flat]
        if return_tensors == "pt":
            pixel = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, self.size, self.size)
            return BatchFeature({"pixel_values": pixel})
        if return_tensors == "np":
            return BatchFeature({"pixel_values": np.stack(arrays) if arrays else np.zeros((0, 3, self.size, self.size),
                                                                                        np.float32)})
        return BatchFeature({"pixel_values": arrays})

    preprocess = __call__

    # -- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # transformers-style keys, so tools that read mean/std/size from this file find them
        return {
            "image_processor_type": "BunnyImageProcessor",
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "size": {"height": self.size, "width": self.size},
            "image_aspect_ratio": self.image_aspect_ratio,
            "resample": self.resample,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
        }

    def save_pretrained(self, out_dir: str | Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / IMAGE_PROCESSOR_FILE, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def for_config(cls, config: Any, vision_path: str | Path | None = None) -> BunnyImageProcessor:
        """The image processor for a ``BunnyConfig``: mean/std from the vision folder's
        preprocessor_config.json when given (else the encoder's defaults), size = the model's input
        size (the largest S^2 scale), mode = ``config.image_aspect_ratio``."""
        encoder_cls = VISION_ENCODERS.get(config.vision_encoder)
        stats = encoder_cls.image_processor_config(vision_path, config.vision_config)
        return cls(size=config.image_size, image_mean=stats["image_mean"], image_std=stats["image_std"],
                   image_aspect_ratio=config.image_aspect_ratio)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "image processor config",
                  size: int | None = None, image_aspect_ratio: str | None = None) -> BunnyImageProcessor:
        """From our file or any transformers CLIP/SigLIP ``preprocessor_config.json`` dict.

        ``size`` / ``image_aspect_ratio`` override the file (e.g. the S^2 input size)."""
        try:
            mean, std = raw["image_mean"], raw["image_std"]
        except KeyError as exc:
            raise ValueError(f"{source}: missing field {exc.args[0]!r}") from None
        if size is None:
            size = _read_size(raw, source)
        mode = image_aspect_ratio or raw.get("image_aspect_ratio") or "pad"
        return cls(size=size, image_mean=mean, image_std=std, image_aspect_ratio=mode,
                   resample=int(raw.get("resample", BICUBIC)))

    @classmethod
    def from_pretrained(cls, path: str | Path, size: int | None = None,
                        image_aspect_ratio: str | None = None) -> BunnyImageProcessor:
        file = Path(path) / IMAGE_PROCESSOR_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no image processor config (image mean/std/size)")
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        return cls.from_dict(raw, source=str(file), size=size, image_aspect_ratio=image_aspect_ratio)

    def __repr__(self) -> str:
        return (f"BunnyImageProcessor(size={self.size}, mode={self.image_aspect_ratio!r}, "
                f"mean={self.image_mean}, std={self.image_std})")


def _read_size(raw: Mapping[str, Any], source: str) -> int:
    """The square input side from a transformers preprocessor config (SigLIP ``size.height``, CLIP
    ``crop_size`` after ``shortest_edge`` resizing)."""
    size = raw.get("crop_size") if raw.get("do_center_crop") else None
    size = size or raw.get("size")
    if isinstance(size, Mapping):
        size = size.get("height") or size.get("shortest_edge") or size.get("width")
    if not isinstance(size, (int, float)) or int(size) <= 0:
        raise ValueError(f"{source}: cannot read the image size from 'size'/'crop_size' ({raw.get('size')!r})")
    return int(size)


def flatten_images(images: Any) -> list[Any]:
    """None, one image, a list of images, or a list of per-sample lists -> flat list in order."""
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        raise TypeError("pass PIL images, paths or bytes; already-preprocessed tensors go to the model as pixel_values")
    out: list[Any] = []
    for item in images:
        if isinstance(item, (list, tuple)):
            out.extend(flatten_images(item))
        elif item is not None:
            out.append(item)
    return out


class BunnyProcessor:
    """Tokenizer + image processor; ``processor(text=[...], images=[...], return_tensors="pt")``.

    Attributes: ``tokenizer``, ``image_processor``, ``image_token`` (``"<image>"``),
    ``image_token_id``, ``num_image_tokens``, ``chat_template`` (a ``bunny.data.templates`` name).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: BunnyImageProcessor,
        image_token_id: int,
        num_image_tokens: int,
        image_token: str = IMAGE_PLACEHOLDER,
        chat_template: str | None = None,
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.chat_template = chat_template
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            # Llama-3-style tokenizers have no pad token; padded positions are masked anyway.
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def for_config(cls, tokenizer: Any, image_processor: BunnyImageProcessor, config: Any) -> BunnyProcessor:
        """The processor matching a ``BunnyConfig`` (image-token id/count, chat template)."""
        return cls(tokenizer, image_processor, image_token_id=config.image_token_id,
                   num_image_tokens=config.num_image_tokens, chat_template=config.chat_template)

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one prompt: BOS (if the tokenizer adds one and ``add_special_tokens``), text pieces,
        ``num_image_tokens`` x ``image_token_id`` for every ``<image>``."""
        if self.image_token != IMAGE_PLACEHOLDER:
            text = text.replace(self.image_token, IMAGE_PLACEHOLDER)
        ids, _ = encode_segments([Segment(text, False)], self.tokenizer, self.image_token_id, self.num_image_tokens)
        if not add_special_tokens:
            prefix = tokenizer_facts(self.tokenizer)["prefix"]
            ids = ids[len(prefix):]
        return ids

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template's prompt text for ``messages`` (``<image>`` placeholders kept)."""
        if self.chat_template is None:
            raise ValueError("this processor has no chat_template name")
        return get_template(self.chat_template).render(messages, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        **kwargs: Any,
    ) -> BatchFeature:
        """Prompts (+ images, in order of their ``<image>`` placeholders over the whole batch) ->
        ``input_ids``, ``attention_mask`` and, when there are images, ``pixel_values``.

        ``images`` may be flat or one list per text. ``padding``: ``True``/``"longest"`` pads to the
        longest row on ``padding_side`` (default ``tokenizer.padding_side``), ``False`` requires equal
        lengths for tensors. A placeholder/image count mismatch is a ``ValueError``.
        """
        if kwargs:
            raise TypeError(f"BunnyProcessor got unsupported arguments: {', '.join(sorted(kwargs))}")
        if text is None:
            if images is None:
                raise ValueError("pass text, images, or both")
            return self.image_processor(images, return_tensors=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        per_sample = images is not None and not isinstance(images, (str, bytes, Path, Image.Image, np.ndarray)) \
            and len(images) == len(texts) and any(isinstance(x, (list, tuple)) for x in images)
        flat = flatten_images(images)
        counts = [t.count(self.image_token) for t in texts]
        if per_sample:
            for i, (t_count, imgs) in enumerate(zip(counts, images)):
                n = len(flatten_images(imgs))
                if n != t_count:
                    raise ValueError(f"text {i} has {t_count} {self.image_token} placeholder(s) but {n} image(s)")
        if sum(counts) != len(flat):
            raise ValueError(
                f"the texts hold {sum(counts)} {self.image_token} placeholder(s) ({counts} per text) but "
                f"{len(flat)} image(s) were given"
            )
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if padding in (False, "do_not_pad") and return_tensors is not None and len({len(x) for x in ids}) > 1:
            raise ValueError("texts of different lengths need padding=True to become one tensor")
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        data = self._pad(ids, side) if return_tensors is not None or padding not in (False, "do_not_pad") else {
            "input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        if return_tensors == "pt":
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
        elif return_tensors == "np":
            data = {k: np.asarray(v, dtype=np.int64) for k, v in data.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if flat:
            data.update(self.image_processor(flat, return_tensors=return_tensors))
        return BatchFeature(data)

    def _pad(self, ids: list[list[int]], side: str) -> dict[str, list[list[int]]]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token (and no eos token to pad with)")
        longest = max((len(x) for x in ids), default=0)
        out_ids, out_mask = [], []
        for row in ids:
            fill = longest - len(row)
            if side == "left":
                out_ids.append([pad_id] * fill + row)
                out_mask.append([0] * fill + [1] * len(row))
            else:
                out_ids.append(row + [pad_id] * fill)
                out_mask.append([1] * len(row) + [0] * fill)
        return {"input_ids": out_ids, "attention_mask": out_mask}

    # -- decoding (tokenizer passthrough) ----------------------------------------------------------
    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(_drop_image_ids(token_ids, self.image_token_id), **kwargs)

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        return [self.decode(seq, **kwargs) for seq in sequences]

    # -- files -----------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Tokenizer files + ``preprocessor_config.json`` + ``processor_config.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        self.image_processor.save_pretrained(out)
        with open(out / PROCESSOR_FILE, "w", encoding="utf-8") as f:
            json.dump({
                "processor_class": "BunnyProcessor",
                "image_token": self.image_token,
                "image_token_id": self.image_token_id,
                "num_image_tokens": self.num_image_tokens,
                "chat_template": self.chat_template,
            }, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False, **tokenizer_kwargs: Any
                        ) -> BunnyProcessor:
        """Read a folder written by :meth:`save_pretrained` (or one of our model folders)."""
        path = Path(path)
        file = path / PROCESSOR_FILE
        if file.is_file():
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        elif (path / "config.json").is_file():  # a model folder without processor_config.json
            config = BunnyConfig.from_pretrained(str(path))
            raw = {"image_token_id": config.image_token_id, "num_image_tokens": config.num_image_tokens,
                   "chat_template": config.chat_template}
        else:
            raise FileNotFoundError(f"{path}: neither {PROCESSOR_FILE} nor config.json")
        for key in ("image_token_id", "num_image_tokens"):
            if key not in raw:
                raise ValueError(f"{file}: missing field {key!r}")
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **tokenizer_kwargs)
        return cls(tokenizer, BunnyImageProcessor.from_pretrained(path), image_token_id=raw["image_token_id"],
                   num_image_tokens=raw["num_image_tokens"], image_token=raw.get("image_token", IMAGE_PLACEHOLDER),
                   chat_template=raw.get("chat_template"))

    def __repr__(self) -> str:
        return (f"BunnyProcessor(tokenizer={type(self.tokenizer).__name__}, image_token_id={self.image_token_id}, "
                f"num_image_tokens={self.num_image_tokens}, chat_template={self.chat_template!r}, "
                f"image_processor={self.image_processor!r})")


def _drop_image_ids(token_ids: Any, image_token_id: int) -> list[int]:
    """Image ids may lie beyond the tokenizer's vocabulary; they decode to nothing."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids if int(t) != image_token_id]
