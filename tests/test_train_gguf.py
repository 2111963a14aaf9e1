"""Training on a ``.gguf`` LLM: ``language_model: FILE.gguf`` assembles the model (the file converted
once, cached by its hash) and ``bunny.train`` runs a LoRA stage on it; the config names GGUF and hub
names in its errors instead of refusing them as missing folders."""

from __future__ import annotations

import json

import pytest
from _gguf import write_tiny_gguf
from _tiny import tiny_tokenizer
from _train_helpers import tiny_cfg
from transformers import SiglipVisionModel

from bunny.model.tiny import tiny_vision_config
from bunny.train.config import ConfigError, TrainConfig

pytest.importorskip("gguf")


@pytest.fixture
def parts(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNNY_GGUF_CACHE", str(tmp_path / "gguf-cache"))
    path = tmp_path / "files" / "tiny-smollm2.Q0.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, tiny_tokenizer("bytelevel"))
    tower = tmp_path / "tower"
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tower)
    (tower / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                                "size": {"height": 28, "width": 28}}))
    return path, tower


def test_stage2_lora_trains_on_a_gguf_language_model(parts, tmp_path):
    from bunny.train import run
    from bunny.train.metrics import read_metrics

    gguf, tower = parts
    cfg = tiny_cfg(tmp_path / "run", "finetune", tiny=None, vision_tower=str(tower), language_model=str(gguf),
                   llm_family="smollm2", max_steps=2, global_batch_size=4)
    cfg.check_paths()
    final = run(cfg)
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    assert (final / "adapter_config.json").is_file()
    assert list((tmp_path / "gguf-cache").iterdir())  # converted once, into the cache
    base = json.loads((tmp_path / "run" / "base" / "config.json").read_text())
    assert base["llm_family"] == "smollm2" and base["text_config"]["model_type"] == "llama"


def test_config_names_gguf_and_hub_problems(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    missing = TrainConfig(data_path=data, vision_tower=str(tmp_path), language_model="models/gone.gguf")
    with pytest.raises(ConfigError, match=r"language_model: GGUF file not found: models/gone.gguf"):
        missing.check_paths()
    wrong_key = TrainConfig(data_path=data, model_name_or_path=tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match=r"GGUF LLM file, not a Bunny model folder; give it as language_model"):
        wrong_key.check_paths()
    TrainConfig(data_path=data, model_name_or_path="BAAI/Bunny-v1_0-3B").check_paths()  # a hub name passes
    with pytest.raises(ConfigError, match="model_name_or_path: not found"):
        TrainConfig(data_path=data, model_name_or_path=tmp_path / "nothing").check_paths()
