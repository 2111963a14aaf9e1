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

