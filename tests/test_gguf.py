"""A ``.gguf`` file as the LLM: converted once (cached by hash) to an HF folder that gives the same
logits, then a Bunny model assembled on it trains a LoRA step and generates (family ``smollm2``)."""

from __future__ import annotations

import json

import pytest
import torch
from _gguf import write_tiny_gguf
from _tiny import tiny_images, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from bunny.model.assemble import assemble_model
from bunny.model.gguf import MARKER, gguf_to_folder
from bunny.model.layouts.lora import quiet_peft
from bunny.model.tiny import tiny_vision_config

pytest.importorskip("gguf")


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNNY_GGUF_CACHE", str(tmp_path / "gguf-cache"))
    tokenizer = tiny_tokenizer("bytelevel")
    path = tmp_path / "files" / "tiny-smollm2.Q0.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path, tokenizer), tokenizer


def test_gguf_converts_once_to_a_folder_with_the_same_logits(gguf_file, tmp_path):
    path, reference, tokenizer = gguf_file
    folder = gguf_to_folder(path)
    assert folder.parent == tmp_path / "gguf-cache" and (folder / MARKER).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert gguf_to_folder(path) == folder and (folder / "config.json").stat().st_mtime_ns == stamp  # cached

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    converted_tok = AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nWhat color is the circle?<|im_end|>\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert converted_tok(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_bunny_on_a_gguf_llm_trains_a_lora_step_and_generates(gguf_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, _, _ = gguf_file
    tower = tmp_path / "tower"
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tower)
    (tower / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                                "size": {"height": 28, "width": 28}}))
    model, processor = assemble_model(tower, path, llm_family="smollm2", seed=0)
    assert model.config.chat_template == "chatml" and model.config.text_config.model_type == "llama"
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])

    with quiet_peft():
        model.language_model = get_peft_model(model.language_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    prompt = processor.render([{"role": "user", "content": "<image>\nWhat is it?"}])
    inputs = processor(text=[prompt + "A circle.<|im_end|>"], images=tiny_images(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.optim.SGD(trainable, lr=0.5).step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, trainable))

    model.eval()
    asked = processor(text=[prompt], images=tiny_images(1))
    with torch.no_grad():
        out = model.generate(**asked, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > asked["input_ids"].shape[1]
