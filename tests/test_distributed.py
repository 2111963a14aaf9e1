"""Scale-out on 2 CPU processes (torchrun, gloo): DDP, DeepSpeed ZeRO-2/3 and FSDP2 reach the weights of a
1-process run with the same global batch.

Tolerance: the processes sum gradients in another order than one process does (all-reduce), so the
weights agree to float32 rounding, amplified a little by Adam over a few steps: max |diff| <= 1e-5
for weights of size ~1e-1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _train_helpers import (
    TINY_TEXT,
    TINY_VISION,
    max_diff,
    one_thread,
    short_instruct,
    trainable_tensors,
    world,
)

from bunny.config import load_config
from bunny.train import run
from bunny.train.config import TrainConfig
from bunny.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, **over) -> Path:
    w = world()
    cfg = {
        "stage": "finetune", "data_path": str(short_instruct()), "image_folder": str(w / "images"),
        "tiny": {"vision": TINY_VISION, "text": TINY_TEXT, "vocab_size": 400}, "model_max_length": 1024,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "per_device_train_batch_size": 2, "global_batch_size": 8,
        "max_steps": 3, "learning_rate": 1e-3, "mm_projector_lr": 5e-4, "logging_steps": 1, "save_steps": 0,
        "progress_bar": False, "cpu_threads": 1, "report_to": ["jsonl"], "warmup_ratio": 0.0, "packing": True,
    }
    cfg.update(over)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(config: Path, out: Path, *extra: str, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "bunny.cli", "train", str(config), f"output_dir={out}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _one_process(config: Path, out: Path, *extra: str) -> None:
    run(load_config(TrainConfig, config, [f"output_dir={out}", *extra]))


def test_ddp_two_processes_equal_one(tmp_path):
    """Also with the fused element-wise kernels on the 2 processes only: DDP's gradient hooks see the
    compiled regions' gradients, and the weights still equal one eager process's."""
    config = _config(tmp_path)
    log = _torchrun(config, tmp_path / "ddp", "fused_elementwise=true")
    assert "fused element-wise kernels: 5 RMSNorm, 2 SiLU MLP" in log, log[-3000:]  # rank 0 logs it
    _one_process(config, tmp_path / "one")
    assert max_diff(trainable_tensors(tmp_path / "one"), trainable_tensors(tmp_path / "ddp")) <= TOL
    la = [r["loss"] for r in read_metrics(tmp_path / "one")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    assert max(abs(a - b) for a, b in zip(la, lb)) < 1e-5
    assert (tmp_path / "ddp" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_sharded_engines_two_processes_equal_one_with_resume(tmp_path, engine):
    """DeepSpeed ZeRO-2/3 (shipped JSON configs) and FSDP2 on 2 processes: stopped after a checkpoint,
    resumed from their own sharded checkpoint format, and equal to one plain process."""
    over = {"distributed": "fsdp"} if engine == "fsdp" else \
        {"deepspeed": str(REPO / "configs" / "deepspeed" / f"{engine}.json")}
    config = _config(tmp_path, save_steps=2, **over)
    out = tmp_path / engine
    _torchrun(config, out, "stop_after_steps=2", timeout=600)
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / ("dcp" if engine == "fsdp" else "deepspeed")).is_dir() and not (out / "final").exists()
    _torchrun(config, out, "resume=true", timeout=600)
    _one_process(config, tmp_path / "one", "distributed=none", "deepspeed=null")
    assert max_diff(trainable_tensors(tmp_path / "one"), trainable_tensors(out)) <= TOL
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
