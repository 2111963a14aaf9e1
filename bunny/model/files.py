"""File I/O the model package shares: JSON, state dicts (safetensors first, torch files only with
``weights_only=True``), and atomic folder writes. The bottom layer: imports nothing from bunny.

Why atomic folders: a crash (or Ctrl-C) mid-save must never leave a half-written model folder that
a later ``load_model`` would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_tensors(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one file: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` (no pickled code runs)."""
    file = Path(file)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a refused pickle, a truncated or foreign file: say which one
        raise ValueError(f"{file}: cannot read its weights ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "only safetensors and plain-tensor torch files load (weights_only=True)") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF folder (safetensors, sharded or not; else pytorch_model.bin, weights_only)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_tensors(f))
    return state


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path) -> Iterator[Path]:
    """Yields a temporary folder beside ``out_dir`` that replaces it on success (the rename is atomic
    on POSIX; an old folder is removed only after the new one is in place). On an exception the
    temporary folder is removed and ``out_dir`` is left as it was."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
