"""Faults that used to cost a training run (issue 12): a bad image met mid-run, a damaged checkpoint,
changed data on resume, malformed JSON data, image paths outside the image folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from _train_helpers import TINY_TEXT, TINY_VISION, max_diff, one_thread, tiny_cfg, trainable_tensors, world

from bunny.cli import main as cli_main
from bunny.train import checkpointing as ckpt_io
from bunny.train import run
from bunny.train.metrics import read_metrics


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


def _small_world(tmp: Path, n: int = 16) -> tuple[Path, Path, list[dict]]:
    """``n`` stage-1 samples (two global batches of 8) and a private copy of their images."""
    w = world()
    data = json.loads((w / "pool.json").read_text())[:n]
    images = tmp / "images"
    for s in data:
        (images / s["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(w / "images" / s["image"], images / s["image"])
    path = tmp / "data.json"
    path.write_text(json.dumps(data))
    return path, images, data


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 9 // 10])  # the header survives (image_check: open passes), the pixels do not


def test_bad_image_mid_run_is_skipped_deterministically(tmp_path, caplog):
    data, images, samples = _small_world(tmp_path)
    _truncate(images / samples[3]["image"])
    (images / samples[9]["image"]).unlink()
    common = dict(data_path=data, image_folder=images, image_check="none", on_bad_sample="skip", max_steps=6,
                  save_steps=2)
    with caplog.at_level(logging.WARNING, logger="bunny.train"):
        run(tiny_cfg(tmp_path / "ref", **common))
    warned = [r.getMessage() for r in caplog.records if "without targets" in r.getMessage()]
    assert any(samples[3]["image"] in m and "step " in m for m in warned), warned
    assert any(samples[9]["image"] in m and "not found" in m.lower() or "no such file" in m.lower()
               for m in warned), warned
    out = tmp_path / "cut"
    assert run(tiny_cfg(out, stop_after_steps=3, **common)) is None
    run(tiny_cfg(out, resume=True, **common))
    assert max_diff(trainable_tensors(tmp_path / "ref"), trainable_tensors(out)) == 0.0
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(tmp_path / "ref")]


def _yaml(tmp: Path, **cfg) -> Path:
    base = {"stage": "pretrain", "tiny": {"vision": TINY_VISION, "text": TINY_TEXT, "vocab_size": 400},
            "model_max_length": 1024, "per_device_train_batch_size": 4, "global_batch_size": 8, "max_steps": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "progress_bar": False, "cpu_threads": 1,
            "report_to": ["jsonl"]}
    base.update({k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_bad_image_mid_run_under_error_saves_then_exits_2(tmp_path, capsys):
    data, images, samples = _small_world(tmp_path)
    _truncate(images / samples[12]["image"])
    out = tmp_path / "run"
    config = _yaml(tmp_path, data_path=data, image_folder=images, image_check="open", on_bad_sample="error",
                   output_dir=out)
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert samples[12]["image"] in err and f"{data}[12]" in err and "failed to load during training" in err
    assert "Traceback" not in err
    ckpt = ckpt_io.latest_checkpoint(out)  # the state before the failing step, saved: nothing is lost
    assert ckpt is not None
    step = ckpt_io.read_state(ckpt)["step"]
    assert step in (0, 1) and [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    shutil.copy(world() / "images" / samples[12]["image"], images / samples[12]["image"])  # the user fixes it
    assert cli_main(["train", str(config), "--resume"]) == 0
    assert (out / "final").is_dir()
    ref = tmp_path / "ref"
    assert cli_main(["train", str(config), f"output_dir={ref}"]) == 0
    assert max_diff(trainable_tensors(ref), trainable_tensors(out)) == 0.0


def test_malformed_json_data_is_an_exit_2_report(tmp_path, capsys):
    data, images, samples = _small_world(tmp_path, n=8)
    text = json.dumps(samples, indent=1)
    cut = text[: text.rindex("}") + 1]
    data.write_text(cut + ",\n]")  # a trailing comma after the last sample: the "]" line is the error
    config = _yaml(tmp_path, data_path=data, image_folder=images, output_dir=tmp_path / "run")
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    line = cut.count("\n") + 2
    assert f"{data}: not valid JSON at line {line}" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, caplog):
    data, images, _ = _small_world(tmp_path)
    common = dict(data_path=data, image_folder=images, max_steps=6, save_steps=2, save_total_limit=3)
    run(tiny_cfg(tmp_path / "ref", **common))
    out = tmp_path / "cut"
    assert run(tiny_cfg(out, stop_after_steps=5, **common)) is None
    newest = ckpt_io.latest_checkpoint(out)
    assert newest.name == "step-00000004" and (newest / "manifest.json").is_file()
    assert ckpt_io.verify_checkpoint(newest) is None
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    assert "trainable.safetensors" in ckpt_io.verify_checkpoint(newest)
    with pytest.raises(ckpt_io.CheckpointError, match=r"step-00000004/trainable.safetensors: 100 bytes"):
        run(tiny_cfg(out, resume=str(newest), **common))  # named explicitly: refused, naming the file
    with caplog.at_level(logging.WARNING, logger="bunny.train"):
        run(tiny_cfg(out, resume=True, **common))
    assert any("step-00000004" in r.getMessage() and "trainable.safetensors" in r.getMessage()
               for r in caplog.records)
    assert max_diff(trainable_tensors(tmp_path / "ref"), trainable_tensors(out)) == 0.0  # resumed from step 2
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    # a flipped byte (same size) is found by the hash
    ckpt = ckpt_io.latest_checkpoint(out)
    opt = ckpt / "optimizer.pt"
    raw = bytearray(opt.read_bytes())
    raw[-10] ^= 0xFF
    opt.write_bytes(bytes(raw))
    assert "optimizer.pt" in ckpt_io.verify_checkpoint(ckpt) and "SHA-256" in ckpt_io.verify_checkpoint(ckpt)


def test_resume_refuses_changed_data_and_allows_extending(tmp_path):
    data, images, samples = _small_world(tmp_path)
    common = dict(data_path=data, image_folder=images, save_steps=2)
    out = tmp_path / "run"
    assert run(tiny_cfg(out, max_steps=4, stop_after_steps=2, **common)) is None
    data.write_text(json.dumps(samples[:-1]))  # one sample removed
    with pytest.raises(ValueError, match=r"training data changed.*data.json: \d+ -> \d+ bytes.*samples read: 16 -> 15"):
        run(tiny_cfg(out, max_steps=4, resume=True, **common))
    data.write_text(json.dumps(samples))
    # extended: 4 -> 8 steps; equals a run planned for 8 steps from the start up to the checkpoint, then
    # follows the 8-step schedule
    run(tiny_cfg(out, max_steps=8, resume=True, **common))
    ref = tmp_path / "ref8"
    run(tiny_cfg(ref, max_steps=8, **common))
    got, want = read_metrics(out), read_metrics(ref)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["lr"] for r in got[2:]] == [r["lr"] for r in want[2:]]  # the schedule of the new total, at once
    assert got[1]["lr"] != want[1]["lr"]  # before the checkpoint: the 4-step schedule it was planned with
    with pytest.raises(ValueError, match="planned for 2 steps, fewer than the 6"):
        run(tiny_cfg(out, max_steps=2, resume=True, **common))


@pytest.mark.slow
def test_bad_image_stand_in_is_the_same_on_two_processes(tmp_path):
    """DDP on 2 processes (torchrun, gloo) with a truncated and a missing image under skip reaches the
    weights of one process: the stand-in depends on the sample alone, not on which process reads it."""
    import os
    import socket
    import subprocess
    import sys

    data, images, samples = _small_world(tmp_path)
    _truncate(images / samples[3]["image"])
    (images / samples[9]["image"]).unlink()
    config = _yaml(tmp_path, data_path=data, image_folder=images, image_check="none", on_bad_sample="skip",
                   per_device_train_batch_size=2, max_steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "bunny.cli", "train", str(config),
                           f"output_dir={tmp_path / 'ddp'}"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=repo)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("without targets") == 2  # each bad sample logged once, by the process that read it
    assert cli_main(["train", str(config), f"output_dir={tmp_path / 'one'}"]) == 0
    assert max_diff(trainable_tensors(tmp_path / "one"), trainable_tensors(tmp_path / "ddp")) <= 1e-5
