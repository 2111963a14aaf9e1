"""Every published Bunny training tutorial (the original repo's ``script/train/tutorials/``) ships as
configs with its own values, and each config, built with tiny stand-in backbones of its families,
trains what the tutorial trains: which parts, at which learning rate per parameter group, with what
LoRA rank and maximum length. The expected values below are transcribed from the tutorials, not
read from the configs, so a wrong value in a config fails here."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from bunny.config import load_config
from bunny.train.config import TinyBackbones, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Finetune:
    data: str  # the data file's name
    lr: float
    projector_lr: float
    lora_r: int
    lora_alpha: int
    max_length: int
    per_device: int  # x accumulation x 8 GPUs = 128 in every tutorial
    unfreeze_vision_tower: bool = False


@dataclasses.dataclass(frozen=True)
class Tutorial:
    source: str  # the tutorial's file in BAAI-DCAI/Bunny script/train/tutorials/
    vision: str  # our encoder family
    llm: str  # our LLM family
    template: str  # the original's --version in our names (bunny, minicpm -> bunny-minicpm, llama -> bunny-llama3)
    pretrain_lr: float
    s2: bool = False
    pretrain_zero: int = 2
    finetunes: dict[str, Finetune] = dataclasses.field(default_factory=dict)
    average: tuple[float, float] | None = None  # weights of recipe-1, recipe-2


F695K = Finetune("bunny_695k.json", 2e-4, 2e-5, 128, 256, 2048, 8)
TUTORIALS: dict[str, Tutorial] = {
    "bunny-phi-1.5-eva-lora": Tutorial("bunny-phi-1.5-eva-lora.md", "eva_clip", "phi-1.5", "bunny", 1e-3,
                                       finetunes={"finetune": F695K}),
    "bunny-phi-1.5-siglip-lora": Tutorial("bunny-phi-1.5-siglip-lora.md", "siglip", "phi-1.5", "bunny", 5e-4,
                                          finetunes={"finetune": F695K}),
    "bunny-phi-2-eva-lora": Tutorial("bunny-phi-2-eva-lora.md", "eva_clip", "phi-2", "bunny", 5e-5,
                                     finetunes={"finetune": F695K}),
    "bunny-v1.0-3b": Tutorial("bunny-phi-2-siglip-lora.md", "siglip", "phi-2", "bunny", 5e-4,
                              finetunes={"finetune": F695K}),
    "bunny-stablelm-2-eva-lora": Tutorial("bunny-stablelm-2-eva-lora.md", "eva_clip", "stablelm-2", "bunny", 1e-3,
                                          finetunes={"finetune": F695K}),
    "bunny-stablelm-2-siglip-lora": Tutorial("bunny-stablelm-2-siglip-lora.md", "siglip", "stablelm-2", "bunny",
                                             5e-4, finetunes={"finetune": F695K}),
    "bunny-qwen1.5-1.8b-siglip-lora": Tutorial("bunny-qwen1.5-1.8b-siglip-lora.md", "siglip", "qwen1.5", "bunny",
                                               5e-4, finetunes={"finetune": F695K}),
    "bunny-minicpm-siglip-lora": Tutorial("bunny-minicpm-siglip-lora.md", "siglip", "minicpm", "bunny-minicpm", 5e-4,
                                          finetunes={"finetune": F695K}),
    "bunny-v1.0-4b": Tutorial(
        "Bunny-v1.0-4B.md", "siglip", "phi-3", "bunny", 1e-3, average=(0.3, 0.7), finetunes={
            "finetune-recipe1": Finetune("bunny_695k.json", 2e-4, 2e-5, 128, 256, 4096, 4),
            "finetune-recipe2": Finetune("bunny_llava_1.4m.json", 2e-4, 2e-5, 128, 256, 4096, 4, True)}),
    "bunny-v1.1-4b": Tutorial(
        "Bunny-v1.1-4B.md", "siglip", "phi-3", "bunny", 1e-3, s2=True, average=(0.3, 0.7), finetunes={
            "finetune-recipe1": Finetune("bunny_allava_1.3m.json", 2e-4, 2e-5, 128, 256, 4096, 4),
            "finetune-recipe2": Finetune("bunny_llava_allava_2m.json", 2e-4, 2e-5, 128, 256, 4096, 4, True)}),
    "bunny-llama-3-8b-v": Tutorial(
        "Bunny-Llama-3-8B-V.md", "siglip", "llama-3", "bunny-llama3", 1e-3, average=(0.5, 0.5), finetunes={
            "finetune-recipe1": Finetune("bunny_695k.json", 2e-4, 2e-5, 128, 256, 2048, 8),
            "finetune-recipe2": Finetune("bunny_llava_1.4m.json", 1e-4, 1e-5, 128, 256, 2048, 8, True)}),
    "bunny-v1.1-llama-3-8b-v": Tutorial(
        "Bunny-v1.1-Llama-3-8B-V.md", "siglip", "llama-3", "bunny-llama3", 1e-3, s2=True, pretrain_zero=3,
        average=(0.42, 0.58), finetunes={
            "finetune-recipe1": Finetune("bunny_allava_1.3m.json", 1e-4, 1e-5, 256, 256, 4096, 4),
            "finetune-recipe2": Finetune("bunny_llava_allava_2m.json", 1e-4, 1e-5, 256, 256, 4096, 4, True)}),
}
FILES = [(name, "pretrain") for name in TUTORIALS] + [(n, f) for n, t in TUTORIALS.items() for f in t.finetunes]


def load(name: str, part: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / f"{name}-{part}.yaml")


def test_every_tutorial_has_its_configs_and_nothing_else():
    assert len({t.source for t in TUTORIALS.values()}) == 12  # every file of script/train/tutorials/
    want = {f"{n}-{p}.yaml" for n, p in FILES} | {f"{n}-average.sh" for n, t in TUTORIALS.items() if t.average}
    have = {p.name for p in CONFIGS.glob("bunny-*")}
    assert have == want


@pytest.mark.parametrize("name,part", FILES, ids=[f"{n}-{p}" for n, p in FILES])
def test_config_carries_the_published_values(name, part):
    t, cfg = TUTORIALS[name], load(name, part)
    assert cfg.num_train_epochs == 1 and cfg.lr_scheduler_type == "cosine" and cfg.warmup_ratio == 0.03
    assert cfg.weight_decay == 0.0 and cfg.bf16 is True and cfg.gradient_checkpointing is True
    assert cfg.group_by_modality_length is False  # every tutorial: --group_by_modality_length False / default
    assert cfg.projector_type == "mlp2x_gelu" and cfg.vision_feature_layer == -2
    assert Path(cfg.output_dir) == Path("runs") / f"{name}-{part}"
    if part == "pretrain":
        assert (cfg.stage, cfg.tune, cfg.template, cfg.image_aspect_ratio) == ("pretrain", "projector", "plain", "square")
        assert cfg.learning_rate == t.pretrain_lr and cfg.model_max_length == 2048
        assert (cfg.global_batch_size, cfg.per_device_train_batch_size) == (256, 8)
        assert (cfg.vision_encoder, cfg.llm_family) == (t.vision, t.llm)
        assert cfg.s2_scales == ([384, 768, 1152] if t.s2 else None)
        assert Path(cfg.data_path[0]).name == "bunny_pretrain_laion_2m.json"
        assert Path(cfg.deepspeed).name == f"zero{t.pretrain_zero}.json"
        assert not cfg.unfreeze_vision_tower
    else:
        f = t.finetunes[part]
        assert (cfg.stage, cfg.tune, cfg.template, cfg.image_aspect_ratio) == ("finetune", "lora", t.template, "pad")
        assert (cfg.learning_rate, cfg.mm_projector_lr) == (f.lr, f.projector_lr)
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (
            f.lora_r, f.lora_alpha, 0.05, "all-linear")
        assert cfg.model_max_length == f.max_length and Path(cfg.data_path[0]).name == f.data
        assert (cfg.global_batch_size, cfg.per_device_train_batch_size) == (128, f.per_device)
        assert cfg.unfreeze_vision_tower is f.unfreeze_vision_tower and cfg.vision_tower_lr is None
        assert Path(cfg.projector_from) == Path(load(name, "pretrain").output_dir)
        assert Path(cfg.deepspeed).name == "zero3.json"
    assert (CONFIGS.parent / cfg.deepspeed).is_file()


def _texts() -> list[str]:
    return ["USER: What is in the picture? ASSISTANT: A red circle on a blue square."] * 4


def tiny_stand_in(name: str, part: str, out: Path) -> TrainConfig:
    """The config with its backbones swapped for tiny random ones of the same families (a finetune
    names none: its families are its stage-1 config's), everything else as shipped."""
    from _train_helpers import TINY_TEXT, TINY_VISION

    cfg, pre = load(name, part), load(name, "pretrain")
    vision = dict(TINY_VISION)
    if pre.vision_encoder == "eva_clip":
        vision.update(projection_dim=16)
    return dataclasses.replace(
        cfg, vision_tower=None, language_model=None, projector_from=None, deepspeed=None, distributed="none",
        output_dir=out, s2_scales=[32, 64] if pre.s2_scales else None, base_dtype="float32",
        tiny=TinyBackbones(vision_encoder=pre.vision_encoder, llm_family=pre.llm_family, vision=vision,
                           text=dict(TINY_TEXT), vocab_size=300))


@pytest.mark.parametrize("name,part", FILES, ids=[f"{n}-{p}" for n, p in FILES])
def test_built_with_tiny_backbones_it_trains_what_the_tutorial_trains(name, part, tmp_path):
    import torch

    from bunny.train.builder import build_start_model
    from bunny.train.stages import configure_trainable, param_groups

    torch.manual_seed(0)
    t = TUTORIALS[name]
    cfg = tiny_stand_in(name, part, tmp_path)
    model, processor, _ = build_start_model(cfg, _texts)
    configure_trainable(model, cfg)
    groups = param_groups(model, cfg)

    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    if part == "pretrain":
        assert lrs == {"mm_projector": t.pretrain_lr}
    else:
        f = t.finetunes[part]
        want = {"mm_projector": f.projector_lr, "language_model": f.lr}
        if f.unfreeze_vision_tower:
            want["vision_tower"] = f.lr  # the original trains an unfrozen tower in the LLM's group
        assert lrs == want
        llm_trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
        assert llm_trainable and all("lora_" in n for n in llm_trainable)
        ranks = {p.shape[0] for n, p in model.language_model.named_parameters() if "lora_A" in n}
        assert ranks == {f.lora_r}
        scaling = {v for m in model.language_model.modules() if isinstance(getattr(m, "scaling", None), dict)
                   for v in m.scaling.values()}  # peft's LoRA layers: alpha / r per adapter
        assert scaling == {f.lora_alpha / f.lora_r}
        assert model.config.chat_template == t.template
    vision_params = list(model.vision_tower.parameters())
    assert all(p.requires_grad for p in vision_params) is (cfg.unfreeze_vision_tower and part != "pretrain")
    assert any(p.requires_grad for p in vision_params) is cfg.unfreeze_vision_tower
    assert all(p.requires_grad for p in model.mm_projector.parameters())
    # the run's tokenizer carries the recipe's maximum length (samples longer than it are validation errors)
    assert processor.tokenizer.model_max_length == cfg.model_max_length == (
        2048 if part == "pretrain" else t.finetunes[part].max_length)
    assert (model.config.vision_encoder, model.config.llm_family) == (t.vision, t.llm)
    assert model.config.s2_scales == ([32, 64] if t.s2 else None)


@pytest.mark.parametrize("name", [n for n, t in TUTORIALS.items() if t.average])
def test_average_step_merges_recipe_2_and_recipe_1_with_the_published_weights(name):
    import argparse

    from bunny.train.cli_average import add_arguments

    t = TUTORIALS[name]
    script = (CONFIGS / f"{name}-average.sh").read_text()
    command = " ".join(line.rstrip("\\").strip() for line in script.splitlines()
                       if line.strip() and not line.lstrip().startswith(("#", "set ")))
    argv = shlex.split(command)
    assert argv[:2] == ["bunny", "average"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv[2:])
    recipe1, recipe2 = (Path(load(name, f"finetune-recipe{i}").output_dir) for i in (1, 2))
    # recipe-2 first: the average keeps the first model's config, and the tutorial inherits recipe-2's
    assert [Path(m) for m in args.models] == [recipe2, recipe1]
    assert args.weights == [t.average[1], t.average[0]]
    assert Path(args.out) == Path("runs") / name
