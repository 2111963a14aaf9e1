"""Original Bunny release folders (model_type bunny-*, the released key names) load with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_images, tiny_model
from safetensors.torch import save_file

import bunny
from bunny.model.loading import detect_layout

RELEASE_TYPE = {"qwen1.5": "bunny-qwen2", "phi-2": "bunny-phi", "minicpm": "bunny-minicpm", "llama-3": "bunny-llama",
                "phi-3": "bunny-phi3", "stablelm-2": "bunny-stablelm"}


def release_folder(root, vision="siglip", family="qwen1.5", vision_keys="4.x", s2=False, drop=(), extra=None,
                   mm_vision_tower=None):
    """Write ``root/release`` the way the original Bunny code saved a model, from a tiny model of ours;
    the vision tower's own folder goes to ``root/tower`` (what ``mm_vision_tower`` names)."""
    model, processor = tiny_model(vision=vision, family=family, s2_scales=[28, 56] if s2 else None, seed=11)
    tower = root / "tower"
    tower.mkdir(parents=True, exist_ok=True)
    inner = model.vision_tower.vision_tower
    if vision == "eva_clip":
        model.config.vision_config.save_pretrained(tower)
        save_file({f"visual.{k}": v.contiguous() for k, v in inner.state_dict().items()}, tower / "model.safetensors")
    else:
        inner.save_pretrained(tower)
    (tower / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": processor.image_processor.image_mean, "image_std": processor.image_processor.image_std,
         "size": {"height": 28, "width": 28}}))
    out = root / "release"
    out.mkdir()
    vision_prefix = {"4.x": "vision_model.", "bare": "", "eva": "model."}[vision_keys]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower.vision_tower."):
            new = "model.vision_tower.vision_tower." + vision_prefix + key[len("vision_tower.vision_tower."):]
        elif key.startswith("mm_projector."):
            new = "model." + key
        elif key.startswith("language_model.model."):
            new = key[len("language_model."):]
        else:
            new = key[len("language_model."):]
        if not any(d in new for d in drop):
            state[new] = value.contiguous()
    state.update(extra or {})
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    text = model.config.text_config.to_dict()
    text.pop("model_type")
    config = {**text, "model_type": RELEASE_TYPE[family], "architectures": ["BunnyQwen2ForCausalLM"],
              "mm_vision_tower": str(mm_vision_tower or tower), "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": model.vision_tower.hidden_size, "use_s2": s2, "image_aspect_ratio": "pad",
              "tokenizer_padding_side": "right"}
    if s2:
        config["s2_scales"] = "28,56"
    (out / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(out)
    return out, model, processor


def _logits(model, processor):
    inputs = processor(text=["<image>\nWhat is this?"], images=tiny_images(1))
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("vision,family,keys,s2", [
    ("siglip", "qwen1.5", "4.x", False),
    ("siglip", "phi-2", "bare", True),
    ("clip", "llama-3", "4.x", False),
    ("eva_clip", "minicpm", "eva", False),
])
def test_release_folder_loads_with_identical_logits(tmp_path, vision, family, keys, s2):
    path, ref_model, ref_proc = release_folder(tmp_path, vision, family, keys, s2=s2)
    assert detect_layout(path) == "bunny-original"
    model, processor = bunny.load_model(path)
    # bunny-phi is phi-1.5 or phi-2 by width (2560: phi-2); the tiny one reads as phi-1.5, same architecture
    assert model.config.llm_family == ("phi-1.5" if family == "phi-2" else family)
    assert model.config.vision_encoder == vision
    assert processor.num_image_tokens == ref_proc.num_image_tokens
    assert processor.image_token_id == ref_proc.image_token_id  # the tokenizer already had <image>
    if s2:
        assert model.config.s2_scales == [28, 56] and processor.image_processor.size == 56
    assert torch.equal(_logits(model, processor), _logits(ref_model, ref_proc))


def test_unused_last_block_may_be_missing(tmp_path):
    path, ref_model, ref_proc = release_folder(tmp_path, drop=("encoder.layers.1.", "vision_tower.vision_tower.head."))
    model, processor = bunny.load_model(path)
    assert torch.equal(_logits(model, processor), _logits(ref_model, ref_proc))


def test_unmatched_keys_are_listed(tmp_path):
    path, _, _ = release_folder(tmp_path, drop=("layers.0.mlp.down_proj",),
                                extra={"model.some_adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError) as err:
        bunny.load_model(path)
    msg = str(err.value)
    assert "model.some_adapter.weight" in msg
    assert "language_model.model.layers.0.mlp.down_proj.weight" in msg


def test_unknown_tower_is_a_clear_error(tmp_path):
    path, _, _ = release_folder(tmp_path, mm_vision_tower="someone/unknown-tower")
    with pytest.raises(FileNotFoundError, match="someone/unknown-tower"):
        bunny.load_model(path)


def test_known_hub_tower_needs_no_download(tmp_path):
    from bunny.model.layouts.original import resolve_vision_tower

    encoder, config, stats = resolve_vision_tower("google/siglip-so400m-patch14-384", tmp_path)
    assert encoder == "siglip" and config.hidden_size == 1152 and config.image_size == 384
    assert stats["image_mean"] == [0.5, 0.5, 0.5]
    encoder, config, _ = resolve_vision_tower("openai/clip-vit-large-patch14-336", tmp_path)
    assert encoder == "clip" and config.num_hidden_layers == 24


def test_export_to_our_layout(tmp_path):
    from bunny.model.cli_export import run

    path, ref_model, ref_proc = release_folder(tmp_path)
    args = type("A", (), {"to": "bunny", "model": str(path), "out": str(tmp_path / "ours"), "dtype": None,
                          "trust_remote_code": False})
    assert run(args) == 0
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "bunny"
    model, processor = bunny.load_model(tmp_path / "ours")
    assert torch.equal(_logits(model, processor), _logits(ref_model, ref_proc))
