"""Train the demo's small backbones (tokenizer, SigLIP-style model, LM) and write them as Hugging Face
folders; by default into the repository's shipped set, which `bunny demo` uses on a fresh clone.

examples:
  bunny backbones                      # (re)make the shipped set: bunny/backbones/shipped/<key>/
  bunny backbones --out ~/my-backbones # somewhere else (a cache folder `bunny demo --cache` reads)
  bunny backbones --check              # is the shipped set intact, and does today's code still make it?
  bunny backbones lm.steps=3000        # other settings (a different key, so a different folder)

See docs/demo.md (the backbones, and the minutes they take).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="backbone settings, e.g. lm.steps=3000")
    p.add_argument("--out", type=Path, default=None, help="parent folder (default: the shipped set's)")
    p.add_argument("--check", action="store_true",
                   help="verify the shipped set: file hashes, and the first training steps reproduce it")


def settings_from(overrides: list[str]):
    """The demo's backbone settings (``bunny demo``'s defaults) with ``key=value`` overrides."""
    from bunny.demo import load_demo_config

    return load_demo_config(None, [f"backbones.{o}" for o in overrides], quick=False).backbones


def run(args: argparse.Namespace) -> int:
    from bunny.backbones import build_backbones
    from bunny.backbones.ship import SHIPPED_DIR, check_shipped
    from bunny.config import ConfigError

    try:
        settings = settings_from(list(args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = check_shipped(settings)
        for line in problems:
            print(f"problem: {line}", file=sys.stderr)
        print("shipped backbones: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
        return 0 if not problems else 1
    bb = build_backbones(args.out or SHIPPED_DIR, settings, force=True)
    print(f"backbones: {bb.root}")
    return 0
