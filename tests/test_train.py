"""Training stages end to end on tiny random backbones and the synthetic world (in process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import max_diff, one_thread, tiny_cfg, trainable_tensors, world
from safetensors.torch import load_file

import bunny
from bunny.cli import main
from bunny.train import run
from bunny.train.config import ConfigError, load_train_config
from bunny.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    final = run(tiny_cfg(out, max_steps=5, save_steps=2, save_total_limit=2))
    return out, final


def test_stage1_trains_only_the_projector(stage1, tmp_path):
    out, final = stage1
    assert final == out / "final"
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["loss"] > 0 and "lr" in r and "samples_per_s" in r for r in records)
    assert (out / "loss.png").stat().st_size > 1000
    # last K checkpoints kept (steps 2 and 4), each complete
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002", "step-00000004"] or \
        sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    trained, _ = bunny.load_model(final)
    # rebuild the start model (same seed, same tokenizer) and compare: only mm_projector moved
    from bunny.train.builder import build_start_model

    cfg = tiny_cfg(out)
    start, _, _ = build_start_model(cfg, lambda: [])
    a, b = start.state_dict(), trained.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("mm_projector.") for k in moved), sorted(moved)[:5]
    assert set(load_file(str(out / "mm_projector.safetensors"))) == {k[len("mm_projector."):] for k in a
                                                                      if k.startswith("mm_projector.")}


def test_projector_init_zero_out_starts_at_zero_and_trains(tmp_path):
    """``projector_init: zero_out`` zeroes a new projector's output layer (every image token starts as
    the same zero vector); training moves it off zero. The default keeps the projector type's init, and
    a projector with no output Linear is refused by name."""
    from bunny.model.projectors import output_layer
    from bunny.train.builder import build_start_model

    zero, _, _ = build_start_model(tiny_cfg(tmp_path / "z", projector_init="zero_out"), lambda: [])
    default, _, _ = build_start_model(tiny_cfg(tmp_path / "d"), lambda: [])
    out_z, out_d = output_layer(zero.mm_projector), output_layer(default.mm_projector)
    assert out_z is zero.mm_projector[-1] and not out_z.weight.any() and not out_z.bias.any()
    assert out_d.weight.abs().sum() > 0
    assert torch.equal(zero.mm_projector[0].weight, default.mm_projector[0].weight)  # only the output layer
    final = run(tiny_cfg(tmp_path / "run", max_steps=3, projector_init="zero_out"))
    trained, _ = bunny.load_model(final)
    assert output_layer(trained.mm_projector).weight.abs().sum() > 0
    assert all(r["loss"] > 0 for r in read_metrics(tmp_path / "run"))
    from bunny.model.projectors import IdentityProjector, zero_output_layer

    with pytest.raises(ValueError, match="IdentityProjector has no output nn.Linear"):
        zero_output_layer(IdentityProjector(8, 8))
    with pytest.raises(ConfigError, match="projector_init: expected one of"):
        load_train_config(None, ["stage=pretrain", "projector_init=zeros"])


def test_feature_cache_gives_the_same_training(stage1, tmp_path):
    out, _ = stage1
    cache = tmp_path / "cache"
    runs = []
    for name in ("a", "b"):
        run(tiny_cfg(tmp_path / name, max_steps=5, feature_cache=cache))
        runs.append(tmp_path / name)
    ref = [r["loss"] for r in read_metrics(out)]
    for r in runs:
        losses = [m["loss"] for m in read_metrics(r)]
        assert max(abs(x - y) for x, y in zip(ref, losses)) < 1e-5
        assert max_diff(trainable_tensors(out), trainable_tensors(r)) < 1e-5
    shards = list(cache.glob("*/shard-*.npy"))
    assert len(shards) == 1, "the second run must reuse the cache, not encode again"
    assert json.loads(next(cache.glob("*/meta.json")).read_text())["covers"]["preprocessing"]["mode"] == "square"


def test_feature_cache_under_bf16_autocast_is_read_back_by_a_new_run(tmp_path):
    cache = tmp_path / "cache"
    losses = []
    for name, over in (("plain", {}), ("build", {"feature_cache": cache}), ("reuse", {"feature_cache": cache})):
        run(tiny_cfg(tmp_path / name, max_steps=2, bf16=True, **over))
        losses.append([r["loss"] for r in read_metrics(tmp_path / name)])
    assert losses[1] == losses[2]  # the second run reads what the first stored, in its stored dtype
    # bf16 kernels round differently for the cache's batches of 32 images than for micro-batches of 4
    assert max(abs(a - b) for a, b in zip(losses[0], losses[1])) < 2e-4


def test_stage2_lora_from_stage1_then_merge_and_average(stage1, tmp_path):
    s1, _ = stage1
    out = tmp_path / "s2"
    cfg = tiny_cfg(out, stage="finetune", projector_from=s1, learning_rate=5e-3, mm_projector_lr=1e-3, max_steps=3)
    final = run(cfg)
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
            "bunny_lora.json", "processor_config.json"} <= names
    assert json.loads((final / "bunny_lora.json").read_text())["base_model"] == str((s1 / "final").resolve())
    adapter = load_file(str(final / "adapter_model.safetensors"))
    wrapped = {k.split(".")[-3] for k in adapter}  # ...<leaf>.lora_A.weight
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(load_file(str(final / "non_lora_trainables.safetensors"))) == {
        "mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight", "mm_projector.2.bias"}
    lrs = read_metrics(out)[0]
    assert lrs["lr/mm_projector/decay"] == pytest.approx(1e-3) and lrs["lr/language_model/decay"] == pytest.approx(5e-3)

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(out), "--out", str(merged)]) == 0
    m_model, m_proc = bunny.load_model(merged)
    from bunny.model.layouts.lora import load_lora_model

    l_model, _ = load_lora_model(final, merge=False)  # the PEFT wrapper kept, unmerged
    from peft import PeftModel

    assert isinstance(l_model.language_model, PeftModel)
    ids = torch.tensor([[5, 6, 7, 8, m_proc.image_token_id] + [m_proc.image_token_id] * (m_proc.num_image_tokens - 1)])
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m_model(input_ids=ids, pixel_values=pix).logits,
                              l_model(input_ids=ids, pixel_values=pix).logits, atol=1e-5)
    avg = tmp_path / "avg"
    assert main(["average", str(s1 / "final"), str(merged), "--weights", "0.3", "0.7", "--out", str(avg)]) == 0
    a, _ = bunny.load_model(avg)
    s1m, _ = bunny.load_model(s1 / "final")
    sa, sb, sc = s1m.state_dict(), m_model.state_dict(), a.state_dict()
    assert max(float((sc[k] - (0.3 * sa[k] + 0.7 * sb[k])).abs().max()) for k in sc) < 1e-6
    with pytest.raises(SystemExit, match="sum to 1"):
        main(["average", str(s1 / "final"), str(merged), "--weights", "0.5", "0.7", "--out", str(tmp_path / "x")])


def test_grad_accumulation_and_supervised_logits_do_not_change_the_result(tmp_path):
    ref = tiny_cfg(tmp_path / "ref", stage="finetune", per_device_train_batch_size=8, global_batch_size=8, max_steps=3,
                   loss_on_supervised_only=False)
    acc = tiny_cfg(tmp_path / "acc", stage="finetune", per_device_train_batch_size=2, global_batch_size=8, max_steps=3,
                   packing=True)
    run(ref)
    run(acc)
    assert max_diff(trainable_tensors(tmp_path / "ref"), trainable_tensors(tmp_path / "acc")) < 2e-5
    la = [r["loss"] for r in read_metrics(tmp_path / "ref")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "acc")]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


def test_full_finetune_and_unfrozen_vision_use_their_own_lr(tmp_path):
    cfg = tiny_cfg(tmp_path / "full", stage="finetune", tune="full", unfreeze_vision_tower=True, vision_tower_lr=1e-5,
                   mm_projector_lr=2e-4, learning_rate=1e-4, max_steps=2, gradient_checkpointing=True)
    final = run(cfg)
    rec = read_metrics(tmp_path / "full")[-1]
    assert rec["lr/vision_tower/decay"] < rec["lr/mm_projector/decay"]
    model, _ = bunny.load_model(final)  # a full model folder
    assert not any("lora" in k for k in model.state_dict())


def test_config_errors_are_clear(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("stage: pretrain\nlearning_rat: 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) learning_rat; known keys: .*learning_rate"):
        load_train_config(yaml_file)
    yaml_file.write_text("stage: pretrain\nper_device_train_batch_size: four\n")
    with pytest.raises(ConfigError, match="per_device_train_batch_size: expected an integer, got 'four'"):
        load_train_config(yaml_file)
    yaml_file.write_text(f"stage: pretrain\ndata_path: {tmp_path}/nope.json\nimage_folder: {tmp_path}/imgs\n"
                         "tiny: {}\n")
    with pytest.raises(ConfigError, match=r"data_path: file not found: .*nope.json.*image_folder: folder not found"):
        load_train_config(yaml_file)
    with pytest.raises(ConfigError, match="stage: expected one of"):
        load_train_config(None, ["stage=align"])
    proc = subprocess.run([sys.executable, "-m", "bunny.cli", "train", str(yaml_file), "lora.r=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config error" in proc.stderr and "lora.r must be positive" in proc.stderr


def test_bad_data_stops_before_training_or_is_skipped(tmp_path):
    w = world()
    data = json.loads((w / "pool.json").read_text())[:16]
    data[3]["image"] = "pool/missing.jpg"
    data[5]["conversations"] = data[5]["conversations"][:1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    from bunny.data.samples import DataValidationError

    with pytest.raises(DataValidationError) as info:
        run(tiny_cfg(tmp_path / "err", data_path=path, max_steps=1))
    assert f"{path}[3]" in str(info.value) and f"{path}[5]" in str(info.value)
    assert not (tmp_path / "err" / "final").exists()
    final = run(tiny_cfg(tmp_path / "skip", data_path=path, max_steps=1, on_bad_sample="skip"))
    assert final.is_dir()


def test_stage1_with_text_only_samples(tmp_path, caplog):
    """A text-only global batch in stage 1 involves no trained weight: it is run and skipped cleanly."""
    from _train_helpers import short_instruct

    text = [s for s in json.loads(short_instruct().read_text()) if "image" not in s][:4]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(text + json.loads((world() / "pool.json").read_text())[:12]))
    with caplog.at_level("WARNING", logger="bunny.train"):
        run(tiny_cfg(tmp_path / "r", data_path=data, max_steps=4, per_device_train_batch_size=4, global_batch_size=4))
    assert "4 text-only samples cost time and teach it nothing" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4]


def test_qlora_needs_cuda(tmp_path):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        run(tiny_cfg(tmp_path / "q", stage="finetune", bits=4))


def test_stage_param_groups_and_lora_targets():
    from _tiny import tiny_model

    from bunny.train.stages import configure_trainable, lora_target_names, param_groups

    for family, expected in (("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
                             ("phi-2", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"})):
        model, _ = tiny_model(family=family)
        assert set(lora_target_names(model.language_model, "all-linear")) == expected
    model, _ = tiny_model(family="qwen2")
    cfg = tiny_cfg(Path("unused"), stage="finetune", mm_projector_lr=2e-5, learning_rate=2e-4)
    configure_trainable(model, cfg)
    groups = {g["name"]: g["lr"] for g in param_groups(model, cfg)}
    assert groups["mm_projector/decay"] == 2e-5 and groups["language_model/decay"] == 2e-4
    assert "vision_tower/decay" not in groups
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("mm_projector.") for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_example_configs_run_on_synth_output(tmp_path):
    """The shipped examples, through the CLI, on `bunny synth` output (shortened here with max_steps;
    the full runs are timed in tests/test_train_examples.py, marked slow)."""
    w = world()
    cli = ["train"]
    common = [f"image_folder={w / 'images'}", "max_steps=2", "progress_bar=false", "cpu_threads=1",
              "per_device_train_batch_size=4", "global_batch_size=4"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main([*cli, str(REPO / "configs/examples/tiny-pretrain.yaml"), f"data_path={w / 'pool.json'}",
                 f"output_dir={s1}", *common]) == 0
    assert main([*cli, str(REPO / "configs/examples/tiny-finetune.yaml"), f"data_path={w / 'instruct.json'}",
                 f"output_dir={s2}", f"projector_from={s1}", *common]) == 0
    for out in (s1, s2):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records and all("step" in r and "loss" in r for r in records)
        assert (out / "final").is_dir()
    model, processor = bunny.load_model(s1 / "final")
    assert processor.num_image_tokens == model.config.num_image_tokens


def test_stage1_from_backbone_folders_like_the_paper_recipes(tmp_path):
    """vision_tower + language_model name HF folders (as google/siglip-so400m and microsoft/phi-2 would be):
    the model is assembled from them, only the new projector trains, the towers stay as loaded."""
    from _tokenizers import trained_bpe
    from _train_helpers import TINY_TEXT, TINY_VISION
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    vision_dir, llm_dir = tmp_path / "siglip", tmp_path / "llm"
    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(vision_dir)
    (vision_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    tok = trained_bpe("bytelevel")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), **TINY_TEXT)).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    final = run(tiny_cfg(tmp_path / "run", tiny=None, vision_tower=str(vision_dir), language_model=str(llm_dir),
                         max_steps=2))
    model, processor = bunny.load_model(final)
    llm = Qwen2ForCausalLM.from_pretrained(llm_dir)
    assert torch.equal(model.language_model.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert model.config.llm_family == "qwen2" and processor.image_processor.size == 32
