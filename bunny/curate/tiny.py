"""A tiny random CLIP-like model folder (``SiglipModel`` or ``CLIPModel``), built offline.

Why: the embed step loads a real Hugging Face folder, and nothing can be downloaded here, so tests
and the offline demo build one: random weights, a word-level tokenizer, the model's own image
processor, all written with ``save_pretrained`` exactly as a downloaded checkpoint is laid out.
The embeddings of random weights are not semantic, but they are deterministic, and an image and
its slightly shifted copy still land close together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

BASIC_WORDS = (
    "a an the of in on at with and or to is are this that there image photo picture shows showing "
    "red green blue yellow black white gray orange purple circle square triangle star small large big "
    "left right top bottom middle center one two three four five six seven eight nine zero"
).split()


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # CLIP pools the text at the end-of-sequence token, so every text must end with one
    tk.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_clip_folder(
    out: str | Path,
    kind: Literal["siglip", "clip"] = "siglip",
    captions: list[str] | None = None,
    dim: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    max_text_length: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random ``kind`` model folder (weights, tokenizer, image processor) to ``out``.

    The tokenizer's vocabulary is ``BASIC_WORDS`` plus the words of ``captions``.
    """
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    words = BASIC_WORDS + sorted({w for c in captions or [] for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    tok = _tokenizer(words)
    text = {"vocab_size": len(tok), "hidden_size": dim, "intermediate_size": 2 * dim, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": max_text_length}
    vision = {"hidden_size": dim, "intermediate_size": 2 * dim, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": patch_size}
    torch.manual_seed(seed)
    if kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    elif kind == "clip":
        ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.eos_token_id}
        model = CLIPModel(CLIPConfig(text_config=text | ids, vision_config=vision, projection_dim=dim))
        processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"kind must be siglip or clip, got {kind!r}")
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    return out
