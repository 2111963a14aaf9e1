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
import json
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


def check_shipped(settings, log=print) -> list[str]:
    """Problems with the shipped set for ``settings`` (empty: intact, and today's code reproduces its
    first training steps): file hashes, the tokenizer retrained, each model's fingerprint after
    ``FINGERPRINT_STEP`` steps of the same training."""
    from bunny.backbones import corpus
    from bunny.backbones.language import train_language
    from bunny.backbones.ship import FINGERPRINT_STEP, SHIPPED_DIR, file_hashes, same_fingerprint
    from bunny.backbones.tokenizer import train_tokenizer, wrap
    from bunny.backbones.vision import train_vision

    root = SHIPPED_DIR / settings.key()
    meta_path = root / "backbones.json"
    if not meta_path.is_file():
        return [f"no shipped backbones for these settings (looked for {meta_path})"]
    meta = json.loads(meta_path.read_text())
    problems = []
    now = file_hashes(root)
    for name, digest in meta["files"].items():
        if now.get(name) != digest:
            problems.append(f"{root / name}: {'missing' if name not in now else 'changed since it was shipped'}")
    problems += [f"{root / name}: not in the manifest" for name in sorted(set(now) - set(meta["files"]))]
    tok = wrap(train_tokenizer(corpus(settings.tokenizer_scenes, settings.seed), settings.vocab_size),
               model_max_length=settings.lm.max_positions)
    shipped_vocab = json.loads((root / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    if tok.get_vocab() != {**shipped_vocab, **{t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}}:
        problems.append("the tokenizer trained today differs from the shipped one")
    side = settings.vision.image_size // settings.vision.patch_size
    runs = {"vision": lambda: train_vision(tok, None, settings.vision, log=None, stop_after=FINGERPRINT_STEP),
            "lm": lambda: train_language(tok, None, settings.lm, side=side, log=None, stop_after=FINGERPRINT_STEP)}
    for part, run in runs.items():
        if log:
            log(f"  re-running the first {FINGERPRINT_STEP} steps of the {part} training")
        bad = same_fingerprint(run()["fingerprint"], meta["figures"][part]["fingerprint"])
        if bad:
            problems.append(f"{part}: the first {FINGERPRINT_STEP} steps no longer reproduce the shipped run "
                            f"({len(bad)} tensors differ, e.g. {bad[0]})")
    return problems


def run(args: argparse.Namespace) -> int:
    from bunny.backbones import build_backbones
    from bunny.backbones.ship import SHIPPED_DIR
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
