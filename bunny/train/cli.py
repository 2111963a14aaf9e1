"""Run one training stage (stage 1 align, or stage 2 instruct) from a YAML config.

Examples:
    bunny synth --out runs/world --images 600
    bunny train configs/examples/tiny-pretrain.yaml data_path=runs/world/pool.json \\
        image_folder=runs/world/images output_dir=runs/tiny-s1
    bunny train configs/examples/tiny-finetune.yaml data_path=runs/world/instruct.json \\
        image_folder=runs/world/images output_dir=runs/tiny-s2 projector_from=runs/tiny-s1
    torchrun --nproc_per_node 8 -m bunny.cli train configs/bunny-v1.0-3b-finetune.yaml
    bunny train CONFIG.yaml output_dir=runs/x --resume      # continue from the newest checkpoint

Overrides are key=value (YAML values; lora.r=64 for the lora section). Every key is documented in
bunny/train/config.py and docs/training.md.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the training YAML (see configs/)")
    # REMAINDER so that --resume may also come after the overrides (handled in run)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="config overrides, e.g. learning_rate=1e-3")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (same as resume=true)")


def run(args: argparse.Namespace) -> int:
    from bunny.train.config import ConfigError, load_train_config

    overrides = [o for o in args.overrides if o != "--resume"]
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        print(f"bunny train: unknown option(s) {' '.join(unknown)}; overrides are key=value", file=sys.stderr)
        return 2
    if args.resume or "--resume" in args.overrides:
        overrides.append("resume=true")
    try:
        cfg = load_train_config(args.config, overrides)
    except ConfigError as exc:
        print(f"bunny train: config error: {exc}", file=sys.stderr)
        return 2
    from bunny.data.samples import DataValidationError
    from bunny.train.checkpointing import CheckpointError
    from bunny.train.trainer import run as train

    try:
        final = train(cfg)
    except (ConfigError, DataValidationError, CheckpointError) as exc:
        print(f"bunny train: {exc}", file=sys.stderr)
        return 2
    if final is not None:
        print(f"model: {final}")
    return 0
