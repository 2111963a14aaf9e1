"""LoRA run folders (ours, and the original Bunny code's) load as base + merged adapter + projector."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_images, tiny_model, tiny_model_folder
from peft import LoraConfig, get_peft_model

import bunny
from bunny.model.layouts.lora import quiet_peft
from bunny.model.layouts.ours import save_model
from bunny.model.loading import detect_layout

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_like(model, seed=0):
    """Wrap the LLM in LoRA and give the adapter and the projector non-trivial values."""
    with quiet_peft():
        model.language_model = get_peft_model(model.language_model, LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith("mm_projector."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _logits(model, processor):
    inputs = processor(text=["<image> what is it?"], images=tiny_images(1))
    with torch.no_grad():
        return model(**inputs).logits


def test_our_lora_run_folder(tmp_path):
    from bunny.train.lora_io import save_lora_run

    base = tiny_model_folder(tmp_path, vision="siglip", family="qwen2", name="base")
    model, processor = bunny.load_model(base)
    _train_like(model)
    run = save_lora_run(model, processor, tmp_path / "run", base_model=base)
    assert detect_layout(run) == "lora"
    ref = _logits(model, processor)  # the PEFT-wrapped model, adapter active
    loaded, lproc = bunny.load_model(run)
    assert type(loaded.language_model).__name__ == "Qwen2ForCausalLM"  # merged
    assert torch.allclose(_logits(loaded, lproc), ref, atol=1e-5)
    merged_out = save_model(loaded, lproc, tmp_path / "merged")
    again, aproc = bunny.load_model(merged_out)
    assert torch.allclose(_logits(again, aproc), ref, atol=1e-5)


def test_lora_run_template_wins_over_the_base(tmp_path):
    """A stage-2 run may train with another chat template than its base: the run's processor decides."""
    from bunny.train.lora_io import save_lora_run

    base = tiny_model_folder(tmp_path, vision="siglip", family="qwen2", name="base")
    model, processor = bunny.load_model(base)
    assert model.config.chat_template == "chatml"
    _train_like(model)
    processor.chat_template = "bunny"
    run = save_lora_run(model, processor, tmp_path / "run", base_model=base)
    loaded, lproc = bunny.load_model(run)
    assert lproc.chat_template == "bunny"
    assert loaded.config.chat_template == "bunny"


def test_original_bunny_lora_folder(tmp_path):
    """The original code's layout: adapter keys in the LLM's names, non_lora_trainables.bin, base in adapter_config."""
    model, processor = tiny_model(vision="siglip", family="qwen1.5", seed=2)
    llm_dir, tower_dir, run = tmp_path / "llm", tmp_path / "tower", tmp_path / "run"
    model.language_model.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)
    model.vision_tower.vision_tower.save_pretrained(tower_dir)
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": processor.image_processor.image_mean, "image_std": processor.image_processor.image_std,
         "size": {"height": 28, "width": 28}}))
    _train_like(model, seed=3)
    ref = _logits(model, processor)
    model.language_model.save_pretrained(run)  # adapter_config.json + adapter_model.safetensors
    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(llm_dir)
    (run / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    torch.save({f"base_model.model.model.{k}": v.clone() for k, v in model.state_dict().items()
                if k.startswith("mm_projector.")}, run / "non_lora_trainables.bin")
    text = model.config.text_config.to_dict()
    text.pop("model_type")
    (run / "config.json").write_text(json.dumps({**text, "model_type": "bunny-qwen2", "mm_vision_tower": str(tower_dir),
                                                 "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
                                                 "use_s2": False, "image_aspect_ratio": "pad"}))
    processor.tokenizer.save_pretrained(run)
    loaded, lproc = bunny.load_model(run)
    assert lproc.image_token_id == processor.image_token_id
    assert torch.allclose(_logits(loaded, lproc), ref, atol=1e-5)


def test_lora_folder_errors(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="cannot tell which model"):
        bunny.load_model(tmp_path)
    (tmp_path / "bunny_lora.json").write_text(json.dumps({"base_model": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="moved"):
        bunny.load_model(tmp_path)
