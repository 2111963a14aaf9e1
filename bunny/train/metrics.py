"""What a run writes for people: metrics.jsonl, TensorBoard (when installed), W&B (when asked), loss.png.

``metrics.jsonl`` has one JSON object per logged optimizer step (``step``, ``loss``, ``lr``,
``grad_norm``, ``samples_per_s``, ``epoch``, ...). A resumed run first drops the lines past the
checkpoint it resumes from, so the file reads as one uninterrupted run.

``report_to`` names where else the same records go: ``tensorboard`` (``output_dir/tensorboard``)
and ``wandb`` (Weights & Biases through its own client, with the run config; ``WANDB_MODE=offline``
writes the run under ``output_dir/wandb`` for a later ``wandb sync``). The W&B run id is kept in
``output_dir/wandb_run_id`` so a resumed run continues the same W&B run instead of starting a new one.
Only the main process builds a writer, so only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: every name ``report_to`` accepts (``jsonl`` is always written; ``none`` turns the extras off)
REPORTERS = ("jsonl", "tensorboard", "wandb", "none")
WANDB_ID_FILE = "wandb_run_id"


def check_report_to(names: Sequence[str]) -> None:
    """Refuse unknown ``report_to`` names (listing the known ones) and ``wandb`` without its client,
    before anything heavy is built."""
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown name(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(REPORTERS)}")
    if "wandb" in names:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("report_to: wandb needs the W&B client: pip install 'bunny[wandb]'")


def _plain(value: Any) -> Any:
    """The run config as JSON types (paths and other objects as strings) for W&B's config panel."""
    return json.loads(json.dumps(value, default=str))


class MetricsWriter:
    def __init__(self, output_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True,
                 report_to: Sequence[str] | None = None, run_config: dict[str, Any] | None = None):
        """``report_to`` (when given) decides TensorBoard and W&B; without it, ``tensorboard`` alone
        decides (the older switch). ``run_config`` is the config W&B records with the run."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to is not None:
            check_report_to(report_to)
            tensorboard = "tensorboard" in report_to
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._wandb = None
        if report_to is not None and "wandb" in report_to:
            self._wandb = self._start_wandb(Path(output_dir), resume_step is not None, run_config or {})
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

    @staticmethod
    def _start_wandb(output_dir: Path, resuming: bool, run_config: dict[str, Any]) -> Any:
        """A W&B run in ``output_dir/wandb``: project from ``WANDB_PROJECT`` (default ``bunny``), name =
        the run folder's name; a resumed training run reopens the W&B run it started."""
        import wandb

        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: lower-case letters and digits
            id_file.write_text(run_id + "\n")
        (output_dir / "wandb").mkdir(exist_ok=True)
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "bunny"), name=output_dir.name, id=run_id,
                          resume="allow", dir=str(output_dir), config=_plain(run_config))

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            step = record["step"]
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            # the optimizer step is W&B's x axis, as it is the JSONL's; non-finite values stay in the JSONL only
            self._wandb.log({f"train/{k}": v for k, v in scalars.items() if math.isfinite(v)}, step=record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


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
