"""`report_to: [wandb]`: a real tiny training run logs through W&B's own client in offline mode; the
run folder W&B writes holds the run config and exactly the JSONL's metrics. Unknown `report_to`
names are refused with the list of known ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _train_helpers import one_thread, tiny_cfg

from bunny.config import ConfigError, load_config
from bunny.train.config import TrainConfig
from bunny.train.metrics import REPORTERS, MetricsWriter, read_metrics

wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "bunny-tests")
    for key in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)


def wandb_records(path: Path):
    """The protobuf records of a ``run-*.wandb`` file: W&B's LevelDB-style log (a 7-byte header
    ``:W&B`` + magic + version, then 32 KiB blocks of chunks, each with a 7-byte header: crc32,
    little-endian length, chunk type 1 full / 2 first / 3 middle / 4 last; 0 is block padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7 or raw[pos + 6] == 0:
            pos += left
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wait_for_exit_record(path: Path, timeout: float = 30.0) -> None:
    """Wait until W&B's service has written the run's ``exit`` record. ``wandb.finish()`` returns
    before the service process has flushed the log's tail: read at once, a run log had been seen
    without its last history row (1 read in 12 lacked the exit record, measured)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
                return
        except Exception:  # a chunk still being written: read again
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record {timeout:.0f} s after wandb.finish()")
        time.sleep(0.05)


def read_offline_run(run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of the one offline W&B run under ``run_dir/wandb``."""
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert logs, f"no offline W&B run under {run_dir / 'wandb'}: {sorted(p.name for p in run_dir.iterdir())}"
    for log in logs:
        wait_for_exit_record(log)
    run_id, config, rows = None, {}, []
    for log in logs:
        for rec in wandb_records(log):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key != "_wandb"})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key != "_wandb"})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return run_id, config, rows


def test_unknown_report_to_names_are_refused_with_the_known_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: pretrain\nreport_to: [jsonl, wandbb]\n")
    with pytest.raises(ConfigError, match="report_to: unknown name.*'wandbb'.*known: jsonl, tensorboard, wandb, none"):
        load_config(TrainConfig, path)
    assert load_config(TrainConfig, None, ["report_to=[jsonl,wandb]"]).report_to == ["jsonl", "wandb"]
    assert set(REPORTERS) == {"jsonl", "tensorboard", "wandb", "none"}


def test_a_training_run_logs_its_config_and_the_jsonl_metrics_to_wandb(tmp_path, offline):
    from bunny.train import run

    out = tmp_path / "wb-run"
    cfg = tiny_cfg(out, report_to=["jsonl", "wandb"], max_steps=3, learning_rate=2e-3)
    run(cfg)
    run_id, config, rows = read_offline_run(out)
    assert run_id == (out / "wandb_run_id").read_text().strip()
    assert config["learning_rate"] == 2e-3 and config["stage"] == "pretrain" and config["max_steps"] == 3
    assert config["output_dir"] == str(out) and config["report_to"] == ["jsonl", "wandb"]
    jsonl = read_metrics(out)
    assert [r["step"] for r in jsonl] == [1, 2, 3]
    assert [r["_step"] for r in rows] == [1, 2, 3]  # the optimizer step is W&B's step
    for want, got in zip(jsonl, rows):
        logged = {k[len("train/"):]: v for k, v in got.items() if k.startswith("train/")}
        assert logged == {k: v for k, v in want.items() if k != "step"}


def test_a_resumed_writer_continues_the_same_wandb_run(tmp_path, offline):
    w = MetricsWriter(tmp_path, report_to=["jsonl", "wandb"], run_config={"seed": 1})
    w.log({"step": 1, "loss": 2.0, "lr": 1e-3})
    w.close()
    first = (tmp_path / "wandb_run_id").read_text().strip()
    w = MetricsWriter(tmp_path, resume_step=1, report_to=["jsonl", "wandb"], run_config={"seed": 1})
    w.log({"step": 2, "loss": 1.5, "lr": 1e-3})
    w.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{first}" in p.name for p in runs)  # (W&B adds -1 to a same-second twin)
    _, _, rows = read_offline_run(tmp_path)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(1, 2.0), (2, 1.5)]
    # a fresh (not resumed) run gets a new id
    MetricsWriter(tmp_path, report_to=["jsonl", "wandb"]).close()
    assert (tmp_path / "wandb_run_id").read_text().strip() != first
