"""Exact resume: a run interrupted after step k and resumed ends with the same weights as one that
never stopped (model, optimizer, scheduler, sampler position and RNG all restored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from _train_helpers import (
    TINY_TEXT,
    TINY_VISION,
    max_diff,
    one_thread,
    short_instruct,
    tiny_cfg,
    trainable_tensors,
    world,
)

from bunny.train import checkpointing as ckpt_io
from bunny.train import run
from bunny.train.metrics import read_metrics


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


def _cfg(out, **over):
    # LoRA dropout draws from the torch RNG every step, packing + grouping exercise the sampler state
    return tiny_cfg(out, stage="finetune", lora={"r": 4, "alpha": 8, "dropout": 0.2}, max_steps=8, save_steps=3,
                    save_total_limit=2, per_device_train_batch_size=2, global_batch_size=4, packing=True, **over)


def test_stop_and_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    run(_cfg(ref))
    out = tmp_path / "cut"
    assert run(_cfg(out, stop_after_steps=5)) is None  # steps 4 and 5 are lost, like a crash would lose them
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step-00000003"]
    # a leftover of a save interrupted mid-write must be ignored and cleaned
    (out / "checkpoints" / ".tmp-step-00000006-w").mkdir()
    run(_cfg(out, resume=True))
    assert not (out / "checkpoints" / ".tmp-step-00000006-w").exists()
    assert max_diff(trainable_tensors(ref), trainable_tensors(out)) == 0.0
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, 9))  # lines past the checkpoint were dropped, no duplicates
    ref_loss = [r["loss"] for r in read_metrics(ref)]
    assert [r["loss"] for r in read_metrics(out)] == ref_loss


def test_resume_refuses_a_changed_recipe(tmp_path):
    out = tmp_path / "r"
    run(_cfg(out, stop_after_steps=3))
    with pytest.raises(ValueError, match=r"differs from the run's in \['learning_rate'\]"):
        run(_cfg(out, resume=True, learning_rate=5e-3))


def test_resume_after_sigkill(tmp_path):
    """A real SIGKILL of a `bunny train` process mid-run; `--resume` finishes it with the weights of an
    uninterrupted run."""
    w = world()
    steps = 30
    cfg = {
        "stage": "finetune", "data_path": str(short_instruct()), "image_folder": str(w / "images"),
        "tiny": {"vision": TINY_VISION, "text": TINY_TEXT, "vocab_size": 400}, "model_max_length": 1024,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.2}, "per_device_train_batch_size": 2, "global_batch_size": 2,
        "max_steps": steps, "save_steps": 3, "save_total_limit": 2, "learning_rate": 1e-3, "logging_steps": 1,
        "progress_bar": False, "cpu_threads": 1, "report_to": ["jsonl"], "warmup_ratio": 0.1,
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bunny.cli", "train", str(config), f"output_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    last = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file():
                lines = metrics.read_text().splitlines()
                if lines:
                    try:
                        last = json.loads(lines[-1])["step"]
                    except json.JSONDecodeError:
                        pass
                if last >= 7:  # past the checkpoint of step 6, mid-way to the next one
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "final").exists() and last < steps
    assert ckpt_io.latest_checkpoint(killed) is not None

    from bunny.config import load_config
    from bunny.train.config import TrainConfig

    resumed = run(load_config(TrainConfig, config, [f"output_dir={killed}", "resume=true"]))
    ref = tmp_path / "ref"
    run(load_config(TrainConfig, config, [f"output_dir={ref}"]))
    assert resumed == killed / "final"
    assert max_diff(trainable_tensors(ref), trainable_tensors(killed)) == 0.0
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, steps + 1))
