"""What a training run writes for people: metrics.jsonl, TensorBoard (when installed), loss.png.

``metrics.jsonl`` has one JSON object per logged optimizer step (``step``, ``loss``, ``lr``,
``grad_norm``, ``samples_per_s``, ``epoch``, ...). A resumed run first drops the lines past the
checkpoint it resumes from, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, output_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(output_dir: str | Path) -> Path | None:
    """``loss.png``: training loss (and lr on a second axis) against the optimizer step."""
    records = [r for r in read_metrics(output_dir) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", linewidth=1.2, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    if all("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", linewidth=0.8, alpha=0.7)
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(Path(output_dir).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
