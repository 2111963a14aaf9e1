"""Shared pieces of the training tests: a small synthetic world on disk and tiny training configs."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# Tiny backbones for training tests: 32 px images, patch 8 -> 16 image tokens; 2-layer 32-wide LLM.
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_TEXT = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024}


@functools.lru_cache(maxsize=4)
def world(n_images: int = 48, seed: int = 0) -> Path:
    """A small synthetic world (images 32 px), shared by every test of the session."""
    from bunny.data.synthetic import generate_world

    root = Path(tempfile.mkdtemp(prefix="bunny-train-world-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # shared across tests, removed at exit
    generate_world(root / "w", n_images, seed, image_size=32, grid=2, bench_size=8, tasks=("pope",))
    return root / "w"


def short_instruct(n: int = 64) -> Path:
    """The world's instruction data without the long descriptions (short sequences, fast steps)."""
    w = world()
    out = w / f"instruct-short-{n}.json"
    if not out.is_file():
        data = json.loads((w / "instruct.json").read_text())
        keep = [s for s in data if sum(len(t["value"]) for t in s["conversations"]) < 300][:n]
        out.write_text(json.dumps(keep))
    return out


def tiny_cfg(out: Path, stage: str = "pretrain", **over: Any):
    """A TrainConfig for a tiny run on the world (stage 1 on pool.json, stage 2 on short instructions)."""
    from bunny.train.config import TinyBackbones, TrainConfig

    w = world()
    base: dict[str, Any] = dict(
        stage=stage,
        output_dir=out,
        data_path=w / "pool.json" if stage == "pretrain" else short_instruct(),
        image_folder=w / "images",
        model_max_length=1024,
        per_device_train_batch_size=4,
        global_batch_size=8,
        max_steps=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=0,
        progress_bar=False,
        cpu_threads=1,
        report_to=["jsonl"],
        seed=0,
    )
    if "tiny" not in over and "model_name_or_path" not in over and "projector_from" not in over:
        base["tiny"] = TinyBackbones(vision=dict(TINY_VISION), text=dict(TINY_TEXT), vocab_size=400)
    if stage == "finetune":
        base.update(lora={"r": 8, "alpha": 16, "dropout": 0.0})
    base.update(over)
    if isinstance(base.get("lora"), dict):
        from bunny.train.config import LoraSection

        base["lora"] = LoraSection(**base["lora"])
    return TrainConfig(**base)


def trainable_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a finished run wrote (projector for stage 1; adapter + projector for LoRA)."""
    from safetensors.torch import load_file

    final = Path(run_dir) / "final"
    out: dict[str, torch.Tensor] = {}
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        if (final / name).is_file():
            out.update(load_file(str(final / name)))
    if not out:
        out.update(load_file(str(Path(run_dir) / "mm_projector.safetensors")))
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def one_thread():
    """Generator for an autouse fixture: tiny models run several times faster on one intra-op thread
    (their ops are too small to split, and a busy 2-core CI machine makes thread hand-offs costly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
