"""The shipped recipes parse and carry the paper's hyperparameters (RECIPE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bunny.config import load_config
from bunny.data.templates import TEMPLATES
from bunny.model.language import LLM_FAMILIES
from bunny.train.config import TrainConfig
from bunny.train.engines.deepspeed import resolve_ds_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("bunny-*.yaml"))


def test_all_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"bunny-v1.0-3b-pretrain", "bunny-v1.0-3b-finetune", "bunny-v1.1-4b-pretrain",
            "bunny-v1.1-4b-finetune-recipe1", "bunny-v1.1-4b-finetune-recipe2", "bunny-v1.1-llama-3-8b-v-pretrain",
            "bunny-v1.1-llama-3-8b-v-finetune-recipe1", "bunny-v1.1-llama-3-8b-v-finetune-recipe2"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_matches_the_paper(path):
    """What every published recipe shares (RECIPE.md); each tutorial's own values: tests/test_recipes.py."""
    cfg = load_config(TrainConfig, path)  # parses with types checked (paths exist only on a user's machine)
    assert cfg.num_train_epochs == 1 and cfg.lr_scheduler_type == "cosine" and cfg.warmup_ratio == 0.03
    assert cfg.weight_decay == 0.0 and cfg.model_max_length in (2048, 4096) and cfg.bf16 is True
    assert cfg.deepspeed is not None and (CONFIGS.parent / cfg.deepspeed).is_file()
    if cfg.stage == "pretrain":
        assert cfg.tune == "projector" and cfg.template == "plain" and cfg.image_aspect_ratio == "square"
        assert cfg.global_batch_size == 256 and cfg.learning_rate in (5e-5, 5e-4, 1e-3)
        assert cfg.projector_type == "mlp2x_gelu" and cfg.vision_feature_layer == -2
        assert cfg.llm_family in LLM_FAMILIES and cfg.vision_encoder in ("siglip", "eva_clip")
        assert cfg.model_max_length == 2048
    else:
        assert cfg.tune == "lora" and cfg.image_aspect_ratio == "pad" and cfg.template in TEMPLATES
        assert cfg.global_batch_size == 128 and (cfg.learning_rate, cfg.mm_projector_lr) in ((2e-4, 2e-5), (1e-4, 1e-5))
        assert (cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (256, 0.05, "all-linear")
        pre = load_config(TrainConfig, path.with_name(path.name.split("-finetune")[0] + "-pretrain.yaml"))
        assert Path(cfg.projector_from) == Path(pre.output_dir)
    if "v1.1" in path.stem and cfg.stage == "pretrain":
        assert cfg.s2_scales == [384, 768, 1152]
    assert cfg.global_batch_size % cfg.per_device_train_batch_size == 0


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_configs_fill_auto_from_the_training_config(name, tmp_path):
    path = CONFIGS / "deepspeed" / f"{name}.json"
    cfg = load_config(TrainConfig, CONFIGS / "bunny-v1.0-3b-finetune.yaml")
    ds = resolve_ds_config(path, cfg, world_size=8, accum=2, bf16=True)
    assert ds["zero_optimization"]["stage"] == int(name[-1])
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"] is True
    raw = json.loads(path.read_text())
    raw["train_batch_size"] = 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="train_batch_size is 64 but the training config gives 128"):
        resolve_ds_config(bad, cfg, world_size=8, accum=2, bf16=True)
