"""Shipping the demo's backbones in the repository, and checking that `bunny backbones` still makes them.

Training the backbones well takes longer than a newcomer's first command should (docs/demo.md gives
the minutes), so the default set is trained once by ``bunny backbones`` and committed under
``bunny/backbones/shipped/<settings key>/``. Two records in its ``backbones.json`` keep it honest:

- ``files``: the SHA-256 of every file, so a damaged or hand-edited copy is caught;
- ``fingerprints``: per-tensor sums of each model after its first ``FINGERPRINT_STEP`` training
  steps, so ``bunny backbones --check`` can re-run the start of the same training (seconds, not
  minutes) and show that today's code still takes the path that made the shipped weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_STEP = 10
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def fingerprint(model) -> dict[str, float]:
    """Per-tensor sums (float64) of a model's parameters: compared with a tolerance, since thread
    counts may change the last bits of a CPU reduction."""
    return {name: round(float(p.detach().double().sum()), 6) for name, p in model.named_parameters()}


def same_fingerprint(a: dict[str, float], b: dict[str, float], rtol: float = 1e-3, atol: float = 1e-3) -> list[str]:
    """The tensor names whose sums differ (empty: the same training path)."""
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if abs(a[k] - b[k]) > atol + rtol * abs(b[k])]


def file_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` but ``backbones.json``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "backbones.json":
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_shipped(settings, log=print) -> list[str]:
    """Problems with the shipped set for ``settings`` (empty: intact, and today's code reproduces its
    first training steps): file hashes, the tokenizer retrained, each model's fingerprint after
    ``FINGERPRINT_STEP`` steps of the same training."""
    import json

    from bunny.backbones import corpus
    from bunny.backbones.language import train_language
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
