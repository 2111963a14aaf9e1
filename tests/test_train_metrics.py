"""What a run writes for people: metrics.jsonl (cut back on resume), TensorBoard events, loss.png."""

from __future__ import annotations

import json

import pytest

from bunny.train.metrics import MetricsWriter, plot_loss, read_metrics


def test_jsonl_resume_drops_lines_past_the_checkpoint_and_torn_lines(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4):
        w.log({"step": step, "loss": 1.0 / step, "lr": 1e-3})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss"')  # a line cut by a kill
    w = MetricsWriter(tmp_path, resume_step=2, tensorboard=False)
    w.log({"step": 3, "loss": 0.25})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[-1]["loss"] == 0.25


def test_tensorboard_events_hold_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        w.log({"step": step, "loss": 2.0 - 0.5 * step, "lr": 1e-3, "note": "text is not a scalar"})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
    assert [round(e.value, 6) for e in acc.Scalars("train/loss")] == [1.5, 1.0, 0.5]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_loss_png_is_a_picture(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - s * 0.1, "lr": 1e-4}) + "\n"
                                                    for s in range(1, 20)))
    out = plot_loss(tmp_path)
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss(tmp_path / "empty") is None
