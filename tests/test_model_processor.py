"""BunnyProcessor: <image> expansion, BOS consistent with the chat templates, padding sides, pixel
modes, count errors, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import tiny_images, tiny_model, tiny_tokenizer
from PIL import Image

from bunny.data.images import expand_to_square, mean_fill
from bunny.data.templates import get_template
from bunny.model.processing import BunnyImageProcessor, BunnyProcessor

MESSAGES = [{"role": "user", "content": "<image>\nWhat is in this picture?"}]


@pytest.fixture(scope="module")
def qwen_processor():
    _, processor = tiny_model(vision="siglip", family="qwen2", tokenizer="qwen")
    return processor


@pytest.mark.parametrize("family,tokenizer", [("qwen2", "qwen"), ("chatml-bpe", "bytelevel"),
                                              ("minicpm", "metaspace"), ("qwen1.5", "bytelevel"),
                                              ("llama-3", "bytelevel"), ("phi-3", "bytelevel")])
def test_prompt_ids_equal_template_encode_prompt(family, tokenizer, qwen_processor):
    if tokenizer == "qwen":
        processor = qwen_processor
        config = processor
    else:
        model, processor = tiny_model(vision="clip", family=family.replace("chatml-bpe", "qwen2"), tokenizer=tokenizer)
        config = model.config
    template = get_template(config.chat_template)
    text = processor.render(MESSAGES)
    assert "<image>" in text
    ids = processor(text=[text], images=tiny_images(1))["input_ids"][0].tolist()
    expected = template.encode_prompt(MESSAGES, processor.tokenizer, processor.image_token_id,
                                      processor.num_image_tokens)
    assert ids == expected
    assert ids.count(processor.image_token_id) == processor.num_image_tokens == 16
    bos = processor.tokenizer.bos_token_id
    if tokenizer == "metaspace":  # the BOS the tokenizer adds by default comes first, exactly once
        assert ids[0] == bos and ids.count(bos) == 1
        assert processor(text=[text], images=tiny_images(1), add_special_tokens=False)["input_ids"][0].tolist() == ids[1:]
    else:
        assert bos is None or bos not in ids


def test_image_expansion_and_text_pieces(qwen_processor):
    p = qwen_processor
    out = p(text=["a <image> b <image>"], images=tiny_images(2))
    ids = out["input_ids"][0].tolist()
    n = p.num_image_tokens
    tok = p.tokenizer
    first = ids.index(p.image_token_id)
    assert ids[:first] == tok.encode("a ", add_special_tokens=False)
    assert ids[first:first + n] == [p.image_token_id] * n
    assert ids.count(p.image_token_id) == 2 * n
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    assert out["pixel_values"].dtype == torch.float32


def test_padding_sides_and_mask(qwen_processor):
    p = qwen_processor
    texts = ["<image> short", "a much longer prompt without any image at all, really, " * 4]
    lens = [len(p.encode(t)) for t in texts]
    for side in ("left", "right"):
        out = p(text=texts, images=tiny_images(1), padding_side=side)
        ids, mask = out["input_ids"], out["attention_mask"]
        assert ids.shape == (2, max(lens))
        assert mask.sum(1).tolist() == lens
        short = mask[0].tolist()
        pad = max(lens) - lens[0]
        assert short == ([0] * pad + [1] * lens[0] if side == "left" else [1] * lens[0] + [0] * pad)
        assert (ids[0][mask[0] == 0] == p.tokenizer.pad_token_id).all()
    # the tokenizer's own padding_side is the default
    p.tokenizer.padding_side = "left"
    try:
        assert p(text=texts, images=tiny_images(1))["attention_mask"][0, 0] == 0
    finally:
        p.tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="padding"):
        p(text=texts, images=tiny_images(1), padding=False)


def test_count_mismatch_and_per_sample_images(qwen_processor):
    p = qwen_processor
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        p(text=["<image><image> x"], images=tiny_images(1))
    with pytest.raises(ValueError, match="1 image"):
        p(text=["no image here"], images=tiny_images(1))
    # per-sample lists are checked per text
    with pytest.raises(ValueError, match="text 0 has 0"):
        p(text=["none", "<image><image>"], images=[tiny_images(1), tiny_images(1, seed=1)])
    out = p(text=["<image> a", "b", "<image><image> c"], images=[tiny_images(1), [], tiny_images(2, seed=3)])
    assert out["pixel_values"].shape[0] == 3
    text_only = p(text=["just text"])
    assert "pixel_values" not in text_only


def test_image_modes_pad_and_square():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    img = tiny_images(1, size=(40, 20))[0]
    pad = BunnyImageProcessor(28, mean, std, "pad")(img)["pixel_values"][0]
    square = BunnyImageProcessor(28, mean, std, "square")(img)["pixel_values"][0]
    assert pad.shape == square.shape == (3, 28, 28)
    # pad: top rows are the mean colour (normalised ~0), square: image content everywhere
    fill = np.asarray(mean_fill(mean), np.float32) / 255
    expected_pad_value = (fill - np.asarray(mean)) / np.asarray(std)
    assert torch.allclose(pad[:, 0, :], torch.tensor(expected_pad_value, dtype=torch.float32)[:, None], atol=1e-5)
    assert not torch.allclose(square[:, 0, :], pad[:, 0, :])
    # equal to resizing the padded square by hand
    by_hand = expand_to_square(img, mean_fill(mean)).resize((28, 28), Image.Resampling.BICUBIC)
    arr = (np.asarray(by_hand, np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    assert np.allclose(pad.numpy(), arr.transpose(2, 0, 1), atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    _, processor = tiny_model(vision="eva_clip", family="minicpm", image_aspect_ratio="square")
    processor.save_pretrained(tmp_path)
    again = BunnyProcessor.from_pretrained(tmp_path)
    assert (again.image_token_id, again.num_image_tokens, again.chat_template) == (
        processor.image_token_id, processor.num_image_tokens, processor.chat_template)
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.image_processor.image_aspect_ratio == "square"
    text = again.render(MESSAGES)
    a = processor(text=[text], images=tiny_images(1))
    b = again(text=[text], images=tiny_images(1))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    ids = a["input_ids"][0]
    assert processor.decode(ids, skip_special_tokens=True) == again.batch_decode(ids[None], skip_special_tokens=True)[0]


def test_decode_drops_image_ids():
    _, processor = tiny_model()
    ids = processor(text=["hello <image> world"], images=tiny_images(1))["input_ids"][0]
    assert processor.decode(ids) == processor.tokenizer.decode(
        [t for t in ids.tolist() if t != processor.image_token_id])


def test_bad_image_mode_and_missing_stats():
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        BunnyImageProcessor(28, [0.5] * 3, [0.5] * 3, "crop")
    with pytest.raises(ValueError, match="image_std"):
        BunnyImageProcessor.from_dict({"image_mean": [0.5] * 3, "size": 28}, source="x.json")
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="num_image_tokens"):
        BunnyProcessor(tok, BunnyImageProcessor(28, [0.5] * 3, [0.5] * 3), image_token_id=5, num_image_tokens=0)
