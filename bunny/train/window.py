"""What the loop reports: every ``logging_steps`` steps, one record of the window since the last one
(mean loss, lr, grad norm, throughput, CPU time) to the metrics file and the progress bar.

All processes call :meth:`StepWindow.step_done` on every step: at a logging step it sums the loss and
the counts over processes (collectives every process must join); only the main process writes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bunny.config import to_dict
from bunny.train.config import TrainConfig
from bunny.train.distributed import DistInfo
from bunny.train.metrics import MetricsWriter


def current_rss_mb() -> float:
    """This process's resident set now, in MB (``/proc/self/statm``; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best available figure
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _progress(cfg: TrainConfig, main: bool, total: int, initial: int):
    if not (main and cfg.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr)


class StepWindow:
    """Loss and throughput accumulated over the steps since the last log line."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, out: Path, steps_per_epoch: int, total_steps: int,
                 start_step: int, resumed: bool) -> None:
        self.cfg, self.dist, self.spe, self.total_steps = cfg, dist, steps_per_epoch, total_steps
        self.metrics = MetricsWriter(out, resume_step=start_step if resumed else None, report_to=cfg.report_to,
                                     run_config=to_dict(cfg)) if dist.is_main else None
        self.bar = _progress(cfg, dist.is_main, total_steps, start_step)
        self.loss = torch.zeros((), dtype=torch.float64, device=dist.device)
        self._reset()

    def _reset(self) -> None:
        self.loss.zero_()
        self.steps, self.samples, self.tokens = 0, 0, 0
        self.t, self.cpu = time.time(), time.process_time()

    def add(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """One micro-batch's share of the loss and its sample and token counts."""
        self.loss += loss.detach().double()
        self.samples += batch["n_samples"]
        self.tokens += batch["n_tokens"]

    def step_done(self, step: int, lrs: dict[str, float], grad_norm: torch.Tensor) -> None:
        self.steps += 1
        if step % self.cfg.logging_steps == 0 or step == self.total_steps:
            self._log(step, lrs, grad_norm)
        if self.bar is not None:
            self.bar.update(1)

    def _log(self, step: int, lrs: dict[str, float], grad_norm: torch.Tensor) -> None:
        dist = self.dist
        loss_sum = dist.all_reduce_sum(self.loss)  # sum over processes of per-micro-batch shares
        samples_all = float(dist.all_reduce_sum(self.samples))
        tokens_all = float(dist.all_reduce_sum(self.tokens))
        elapsed = max(time.time() - self.t, 1e-9)
        record = {
            "step": step,
            "epoch": round(step / self.spe, 4),
            "loss": float(loss_sum) / self.steps,
            "lr": max(lrs.values()),
            "grad_norm": float(grad_norm),
            "samples_per_s": samples_all / elapsed,
            "tokens_per_s": tokens_all / elapsed,
            "step_s": elapsed / self.steps,
            "cpu_s": (time.process_time() - self.cpu) / self.steps,  # this process's CPU time per step
            "rss_mb": round(current_rss_mb(), 1),  # resident memory now (flat after warm-up, or a leak)
            **{f"lr/{k}": v for k, v in lrs.items()},
        }
        if self.metrics is not None:
            self.metrics.log(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
        self._reset()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
