"""Training: the two Bunny stages (align, instruct), LoRA/full fine-tuning, scale-out, exact resume.

Python entry point (what ``bunny train`` calls)::

    from bunny.train import TrainConfig, load_train_config, run
    cfg = load_train_config("configs/examples/tiny-pretrain.yaml", ["output_dir=runs/s1"])
    final = run(cfg)            # output_dir/final, a folder bunny.load_model opens
"""

from __future__ import annotations

from bunny.train.config import ConfigError, TrainConfig, load_train_config

__all__ = ["ConfigError", "TrainConfig", "load_train_config", "run"]


def run(config: TrainConfig):
    """Run one training stage; returns ``output_dir/final`` (see ``bunny.train.trainer``)."""
    from bunny.train.trainer import run as _run

    return _run(config)
