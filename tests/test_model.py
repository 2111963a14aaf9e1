"""BunnyForConditionalGeneration: every encoder x every LLM family, image splicing, projectors, errors."""

from __future__ import annotations

import pytest
import torch
from _tiny import FAMILIES, VISIONS, tiny_images, tiny_model

from bunny.model.language import LLM_FAMILIES
from bunny.model.projectors import PROJECTORS
from bunny.model.vision import VISION_ENCODERS


def test_every_registered_part_is_covered():
    assert set(VISIONS) == set(VISION_ENCODERS.names())
    assert set(FAMILIES) == set(LLM_FAMILIES.names())
    assert {"linear", "identity"} <= set(PROJECTORS.names())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("vision", VISIONS)
def test_forward_with_labels_and_generate(vision, family):
    model, processor = tiny_model(vision=vision, family=family)
    processor.tokenizer.padding_side = "left"
    text = processor.render([{"role": "user", "content": "<image>\nWhat is it?"}])
    inputs = processor(text=[text, "plain text row"], images=tiny_images(1), return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.mm_projector[0].weight.grad is not None and model.mm_projector[0].weight.grad.abs().sum() > 0
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_image_features_are_spliced_where_the_tokens_are():
    model, processor = tiny_model(vision="clip", family="llama-3")
    images = tiny_images(2, seed=4)
    inputs = processor(text=["a <image> b <image> c"], images=images)
    embeds = model.embed_inputs(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    feats = model.get_image_features(inputs["pixel_values"])
    mask = inputs["input_ids"][0] == model.config.image_token_id
    assert torch.allclose(embeds[0][mask], feats.reshape(-1, feats.shape[-1]))
    text_pos = ~mask
    ref = model.get_input_embeddings()(inputs["input_ids"][0][text_pos])
    assert torch.equal(embeds[0][text_pos], ref)


def test_batch_mixing_images_matches_rows_run_alone():
    model, processor = tiny_model(vision="siglip", family="qwen2", seed=3)
    processor.tokenizer.padding_side = "left"
    images = tiny_images(3, seed=5)
    texts = ["<image> one image", "no image at all here", "<image> and <image> two"]
    batch = processor(text=texts, images=images)
    logits = model(**batch).logits
    singles = [([texts[0]], images[:1]), ([texts[1]], None), ([texts[2]], images[1:])]
    for row, (text, imgs) in enumerate(singles):
        alone = processor(text=text, images=imgs)
        n = alone["input_ids"].shape[1]
        ref = model(**alone).logits[0, -1]
        assert torch.allclose(logits[row, -1], ref, atol=1e-4), row
        assert n <= batch["input_ids"].shape[1]


def test_count_mismatch_is_a_value_error():
    model, processor = tiny_model()
    inputs = processor(text=["<image> x"], images=tiny_images(1))
    with pytest.raises(ValueError, match="image-token positions"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="no images were given"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize("projector,tokens", [("linear", 16), ("mlp3x_gelu", 16), ("avgpool2x2_mlp2x_gelu", 4),
                                              ("identity", 16)])
def test_projectors_and_token_counts(projector, tokens):
    kwargs = {"text_overrides": {"hidden_size": 32}} if projector == "identity" else {}
    model, processor = tiny_model(vision="clip", family="phi-2", projector_type=projector, **kwargs)
    assert processor.num_image_tokens == model.config.num_image_tokens == tokens
    inputs = processor(text=["<image> hi"], images=tiny_images(1))
    assert (inputs["input_ids"] == processor.image_token_id).sum() == tokens
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


def test_s2_model_runs_at_the_largest_scale():
    model, processor = tiny_model(vision="siglip", family="qwen2", s2_scales=[28, 56, 84])
    assert processor.image_processor.size == 84
    assert model.vision_tower.hidden_size == 3 * 32
    inputs = processor(text=["<image> hi"], images=tiny_images(1))
    assert inputs["pixel_values"].shape[-1] == 84
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_supervised_logits_only_gives_the_same_loss():
    model, processor = tiny_model(vision="eva_clip", family="stablelm-2")
    inputs = processor(text=["<image> describe the cat", "hello world"], images=tiny_images(1), padding_side="right")
    labels = inputs["input_ids"].clone()
    labels[:, :5] = -100
    labels[inputs["attention_mask"] == 0] = -100
    labels[inputs["input_ids"] == processor.image_token_id] = -100  # the model ignores image positions anyway
    full = model(**inputs, labels=labels).loss
    sparse = model(**inputs, labels=labels, supervised_logits_only=True)
    assert torch.allclose(full, sparse.loss, atol=1e-5)
    assert sparse.logits.shape[0] == int((labels[:, 1:] != -100).sum())
