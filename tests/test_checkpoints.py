"""Our model folders (save/load, Auto classes, atomic writes) and assembly from vision + LLM folders."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_images, tiny_model, tiny_model_folder, tiny_tokenizer
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

import bunny
from bunny.model.assemble import assemble_model, detect_vision_encoder
from bunny.model.layouts.ours import save_model
from bunny.model.loading import detect_layout
from bunny.model.tiny import TINY_VISION, tiny_text_config, tiny_vision_config
from bunny.model.vision.eva_clip import EvaClipEncoder

PROMPT = "<image>\nWhat is it?"


def _logits(model, processor, images=None):
    images = images or tiny_images(1)
    inputs = processor(text=[processor.render([{"role": "user", "content": PROMPT}])], images=images)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("vision,family", [("siglip", "qwen2"), ("eva_clip", "minicpm"), ("clip", "phi-3")])
def test_save_load_round_trip_and_auto_class(tmp_path, vision, family):
    model, processor = tiny_model(vision=vision, family=family)
    path = save_model(model, processor, tmp_path / "m")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", "processor_config.json"} <= names
    assert not list(tmp_path.glob(".m.tmp-*"))
    loaded, lproc = bunny.load_model(path)
    assert not loaded.training
    ref = _logits(model, processor)
    assert torch.equal(_logits(loaded, lproc), ref)
    auto = AutoModelForImageTextToText.from_pretrained(path)
    assert type(auto).__name__ == "BunnyForConditionalGeneration"
    assert torch.equal(_logits(auto, lproc), ref)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    half, _ = bunny.load_model(path, dtype="bfloat16", device="cpu")
    assert half.dtype == torch.bfloat16 and half.vision_tower.dtype == torch.bfloat16


def test_save_replaces_atomically(tmp_path, monkeypatch):
    path = tiny_model_folder(tmp_path, seed=1)
    before = (path / "model.safetensors").read_bytes()
    model, processor = tiny_model(seed=2)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(processor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, processor, path)
    assert (path / "model.safetensors").read_bytes() == before  # the old folder is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    save_model(model, processor, path)
    assert (path / "model.safetensors").read_bytes() != before


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        bunny.load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        detect_layout(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        detect_layout(tmp_path)


# ---- assembly from parts ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    tok = tiny_tokenizer("bytelevel")
    config = tiny_text_config("phi-2", vocab_size=len(tok) + 8, eos_token_id=tok.eos_token_id)
    torch.manual_seed(7)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(root)
    tok.save_pretrained(root)
    return root, lm


def _write_stats(folder, mean, std, size=28):
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "image_mean": mean, "image_std": std,
         "size": {"height": size, "width": size}, "resample": 3}))


def test_assemble_siglip_full_model_folder(tmp_path, llm_folder):
    llm_path, lm = llm_folder
    torch.manual_seed(3)
    small = {k: v for k, v in TINY_VISION.items() if k != "image_size" and k != "patch_size"}
    full = SiglipModel(SiglipConfig(vision_config=tiny_vision_config("siglip").to_dict(),
                                    text_config=dict(small, vocab_size=50, max_position_embeddings=16)))
    full.save_pretrained(tmp_path / "siglip")
    _write_stats(tmp_path / "siglip", [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert detect_vision_encoder(tmp_path / "siglip") == "siglip"
    model, processor = assemble_model(tmp_path / "siglip", llm_path, seed=0)
    assert model.config.llm_family == "phi-2" and model.config.chat_template == "bunny"
    # pretrained weights kept, text tower dropped
    own = model.vision_tower.vision_tower.state_dict()
    for k, v in full.vision_model.state_dict().items():
        assert torch.equal(own[k], v), k
    for k, v in lm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[k], v), k
    assert processor.image_processor.image_mean == [0.1, 0.2, 0.3]
    assert processor.tokenizer.convert_ids_to_tokens(processor.image_token_id) == "<image>"
    # a new projector, seeded
    again, _ = assemble_model(tmp_path / "siglip", llm_path, seed=0)
    assert torch.equal(again.mm_projector[0].weight, model.mm_projector[0].weight)
    ref = _logits(model, processor)
    path = save_model(model, processor, tmp_path / "out")
    loaded, lproc = bunny.load_model(path)
    assert torch.allclose(_logits(loaded, lproc), ref)


def test_assemble_transformers5_bare_vision_and_clip(tmp_path, llm_folder):
    llm_path, _ = llm_folder
    bare = SiglipVisionModel(tiny_vision_config("siglip"))
    bare.save_pretrained(tmp_path / "bare")  # transformers 5 keys: no vision_model. prefix
    model, _ = assemble_model(tmp_path / "bare", llm_path, projector_type="linear", s2_scales=[28, 56])
    assert torch.equal(model.vision_tower.vision_tower.embeddings.patch_embedding.weight,
                       bare.embeddings.patch_embedding.weight)
    assert model.vision_tower.hidden_size == 64
    clip = CLIPModel(CLIPConfig(vision_config=tiny_vision_config("clip").to_dict(),
                                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, vocab_size=50), projection_dim=8))
    clip.save_pretrained(tmp_path / "clip")
    model, processor = assemble_model(tmp_path / "clip", llm_path, llm_family="phi-1.5", image_aspect_ratio="square")
    assert model.config.vision_encoder == "clip" and processor.num_image_tokens == 16
    assert processor.image_processor.image_aspect_ratio == "square"
    assert torch.equal(model.vision_tower.vision_tower.pre_layrnorm.weight,
                       clip.vision_model.pre_layrnorm.weight)


def test_assemble_eva_checkpoint_file(tmp_path, llm_folder):
    llm_path, _ = llm_folder
    enc = EvaClipEncoder(tiny_vision_config("eva_clip", hidden_size=64, num_attention_heads=4))
    sd = {f"visual.{k}": v.contiguous() for k, v in enc.vision_tower.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.zeros(4, 4)  # the CLIP text half is ignored
    save_file(sd, tmp_path / "eva.safetensors")
    model, processor = assemble_model(tmp_path / "eva.safetensors", llm_path)
    assert model.config.vision_encoder == "eva_clip"
    for k, v in enc.vision_tower.state_dict().items():
        assert torch.equal(model.vision_tower.vision_tower.state_dict()[k], v), k
    assert processor.image_processor.image_mean[0] == pytest.approx(0.48145466)


def test_assemble_errors(tmp_path, llm_folder):
    llm_path, _ = llm_folder
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="vision_encoder="):
        assemble_model(tmp_path / "v", llm_path)
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match="expects a config of model_type llama"):
        assemble_model(tmp_path / "s", llm_path, llm_family="llama-3")
