"""Stage 1 alone, on one arm of a finished demo, for several seeds: how reliably the projector grounds.

Runs the demo's stage 1 (``bunny.demo.train_stage`` with the demo's stage-1 settings: the projector
alone, ``plain`` captions, batch 32, 30 warmup steps) on the
coreset or the raw pool of a demo output folder, with the shipped backbones, then captions 48 held-out
images and reads the captions back fact by fact (``bunny.demo_probes.caption_probe``, rung (d) of the
probe ladder). One JSON line per seed. A collapsed projector shows as colour+shape near 0.1 and a low
precision: the captions describe objects the image does not hold. ``left_plateau_at``: the first logged
step whose loss is below 0.5 (the plateau sits near 0.7).

    .venv/bin/python scripts/stage1_seeds.py runs/demo --arm coreset --lr 5e-3 --steps 1000 --seeds 0 1 \
        [--projector-init default] [--warmup-steps 5]

docs/demo.md ("Stage 1: learning rate, steps and seeds") records the figures it printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bunny.backbones import BackboneSettings
from bunny.backbones.ship import SHIPPED_DIR
from bunny.demo import DemoConfig, train_stage
from bunny.demo_probes import caption_probe


def shipped_set(settings: BackboneSettings) -> Path:
    root = SHIPPED_DIR / settings.key()
    if not (root / "backbones.json").is_file():
        raise SystemExit(f"no shipped backbones for the demo's settings at {root}: run `bunny backbones` first")
    return root


def left_plateau_at(run_dir: Path, below: float = 0.5) -> int | None:
    """The first logged step whose loss is below ``below`` (the plateau sits near 0.7, a grounded
    projector's loss near 0.3); None when the run never got there."""
    from bunny.train.metrics import read_metrics

    return next((r["step"] for r in read_metrics(run_dir) if r.get("loss", 1.0) < below), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_out", type=Path, help="a `bunny demo --out` folder (its world/ and curate/)")
    p.add_argument("--arm", choices=("coreset", "raw_pool"), default="coreset")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--warmup-steps", type=int, default=DemoConfig().stage1["warmup_steps"])
    p.add_argument("--projector-init", choices=("default", "zero_out"), default=DemoConfig().stage1["projector_init"],
                   help="the new projector's output layer (the demo's: zero_out)")
    a = p.parse_args()
    torch.set_num_threads(1)
    bb = shipped_set(DemoConfig().backbones)
    world = a.demo_out / "world"
    data = a.demo_out / "curate" / "coreset.json" if a.arm == "coreset" else world / "pool.json"
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            final = train_stage("pretrain", {**DemoConfig().stage1, "max_steps": a.steps, "learning_rate": a.lr,
                                             "seed": seed, "projector_init": a.projector_init,
                                             "warmup_steps": a.warmup_steps},
                                output_dir=Path(tmp), vision_tower=bb / "siglip", language_model=bb / "lm",
                                data_path=data, image_folder=world / "images")
            probe = caption_probe(final, n=48)
            left = left_plateau_at(Path(tmp))
        print(json.dumps({"arm": a.arm, "lr": a.lr, "steps": a.steps, "seed": seed, "init": a.projector_init,
                          "warmup_steps": a.warmup_steps, "left_plateau_at": left,
                          **{k: v for k, v in probe.items() if k != "examples"}}), flush=True)


if __name__ == "__main__":
    main()
