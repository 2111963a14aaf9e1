"""Merge a LoRA run into its base model: a normal model folder for eval, serving and export.

Example:
    bunny merge --model runs/tiny-s2 --out runs/tiny-s2-merged     # a run folder or its final/
    bunny eval --model runs/tiny-s2-merged --task pope --data runs/world/bench/pope --out runs/eval

The LoRA folder names its base (bunny_lora.json); the adapter is folded into the base's Linear
weights (W + B A * alpha / r), the trained projector replaces the base's, and the result is saved
with bunny's save_model (safetensors, tokenizer and image processor beside).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a LoRA run folder (or the run's output_dir holding final/)")
    p.add_argument("--out", required=True, help="where to write the merged model folder")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the base's)")


def lora_folder(path: str | Path) -> Path:
    from bunny.train.lora_io import LORA_META

    path = Path(path)
    for cand in (path, path / "final"):
        if (cand / LORA_META).is_file():
            return cand
    raise SystemExit(f"bunny merge: {path} is not a LoRA run folder (no {LORA_META} in it or in its final/)")


def run(args: argparse.Namespace) -> int:
    import torch

    from bunny.model.layouts.ours import save_model
    from bunny.model.loading import load_model

    folder = lora_folder(args.model)
    model, processor = load_model(folder)  # a LoRA folder loads merged into its base
    if args.dtype:
        model.to(getattr(torch, args.dtype))
    out = save_model(model, processor, args.out)
    print(f"merged {folder} into its base: {out}")
    return 0
