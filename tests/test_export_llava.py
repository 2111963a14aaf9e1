"""Logits parity with transformers' LlavaForConditionalGeneration, both directions, and the export CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_images, tiny_model, tiny_model_folder, tiny_tokenizer
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import bunny
from bunny.model.layouts.llava import LlavaExportError, export_llava
from bunny.model.tiny import round_vocab, tiny_text_config, tiny_vision_config

PROMPT = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]


@pytest.mark.parametrize("vision,family,mode", [("siglip", "qwen2", "square"), ("clip", "llama-3", "square"),
                                                ("clip", "phi-3", "pad")])
def test_export_gives_the_same_logits_and_inputs(tmp_path, vision, family, mode):
    model, processor = tiny_model(vision=vision, family=family, image_aspect_ratio=mode, seed=5)
    out = export_llava(model, processor, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    auto = AutoProcessor.from_pretrained(out)
    assert isinstance(auto, LlavaProcessor)
    text = processor.render(PROMPT)
    images = tiny_images(2, seed=1)
    ours = processor(text=[text, text], images=images, padding_side="left")
    theirs = auto(text=[text, text], images=images, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    if mode == "square":
        assert torch.allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-6)
    else:  # pad colour: int(mean*255) in transformers/original Bunny vs round() in bunny.data.images
        assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() < 0.05
    with torch.no_grad():
        ref = model(**ours).logits
        got = llava(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                    pixel_values=ours["pixel_values"]).logits
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    # and greedy generation agrees
    gen_kwargs = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(model.generate(**ours, **gen_kwargs), llava.generate(**ours, **gen_kwargs))
    # the exported folder loads back into ours with the same logits and chat template
    back, bproc = bunny.load_model(out)
    assert back.config.chat_template == model.config.chat_template
    with torch.no_grad():
        assert torch.equal(back(**bproc(text=[text, text], images=images, padding_side="left")).logits, ref)


def test_llava_folder_written_by_transformers_loads(tmp_path):
    """A Llava folder built with transformers alone (CLIP, CLS dropped by the 'default' strategy)."""
    tok = tiny_tokenizer("bytelevel")
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=tiny_vision_config("clip").to_dict() | {"model_type": "clip_vision_model"},
        text_config=tiny_text_config("llama-3", vocab_size=round_vocab(len(tok))).to_dict(),
        image_token_id=image_id, vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu", image_seq_length=16)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path)
    image_processor = LlavaImageProcessorPil(do_pad=True, size={"height": 28, "width": 28}, do_center_crop=False,
                                             image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2])
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=7, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(tmp_path)
    model, processor = bunny.load_model(tmp_path)
    assert model.config.vision_feature_select == "patch" and processor.num_image_tokens == 16
    assert processor.image_processor.image_mean == [0.5, 0.4, 0.3]
    assert processor.image_processor.image_aspect_ratio == "pad"
    inputs = processor(text=["hi <image> there"], images=tiny_images(1))
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, llava(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("overrides,reason", [
    (dict(vision="siglip", s2_scales=[28, 56]), "S\\^2"),
    (dict(vision="eva_clip"), "no transformers class"),
    (dict(projector_type="linear"), "not Llava's mlp2x_gelu"),
    (dict(family="phi-2"), "lm_head has a bias"),
    (dict(family="minicpm"), "MiniCPM"),
])
def test_export_refuses_what_llava_cannot_represent(tmp_path, overrides, reason):
    model, processor = tiny_model(**overrides)
    with pytest.raises(LlavaExportError, match=reason):
        export_llava(model, processor, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_cli(tmp_path, capsys):
    from bunny.cli import main

    src = tiny_model_folder(tmp_path, vision="siglip", family="llama-3")
    assert main(["export", "--to", "llava-hf", "--model", str(src), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava"
    s2 = tiny_model_folder(tmp_path, vision="siglip", s2_scales=[28, 56], name="s2")
    assert main(["export", "--to", "llava-hf", "--model", str(s2), "--out", str(tmp_path / "bad")]) == 2
    assert "S^2" in capsys.readouterr().err
