"""Checkpoints that survive a kill at any instant, and exact resume.

Layout (``output_dir/checkpoints/``)::

    step-00000100/
      trainer_state.json     step, epoch, sampler position, world size, config digest
      trainable.safetensors  every parameter that trains (LoRA + projector, or all for full FT)
      optimizer.pt           AdamW moments, keyed by parameter name (not by position)
      scheduler.pt
      rng/rank0.pt ...       python, numpy, torch (CPU + CUDA) generator states of every process
      deepspeed/ or dcp/     instead of the two files above under DeepSpeed / FSDP2
      manifest.json          size and SHA-256 of every file above, written last (see verify_checkpoint)

Why atomic: a checkpoint is written to a hidden temporary folder next to the final one and
renamed into place only when every process has finished writing (``os.rename`` of a folder is
atomic on POSIX). A kill mid-write leaves a ``.tmp-*`` folder that is ignored and cleaned up, never
a half-written ``step-*`` that resume would trust. Old checkpoints are removed by first renaming
them out of the ``step-*`` namespace, for the same reason.

Why only trainable weights: frozen weights are rebuilt from the base checkpoint on resume, so a
LoRA checkpoint of a 3B model is a few hundred MB, not 6 GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_RE = re.compile(r"^step-(\d{8})$")
log = logging.getLogger("bunny.train")


class CheckpointError(ValueError):
    """A checkpoint cannot be used (damaged, or not this run's): the message names the file."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts only with its trainer_state.json)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def clean_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove ``.tmp-*`` / ``.del-*`` leftovers of a run killed while saving or pruning."""
    root = checkpoint_root(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def begin(output_dir: str | Path, step: int, *, rank: int = 0, token: str | None = None) -> Path:
    """The temporary folder every process writes this checkpoint into.

    ``token`` must be the same on every process (rank 0 picks it and broadcasts it, or the step
    number is used), so all processes write into one folder.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{token or 'x'}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "rng").mkdir(exist_ok=True)
    return tmp


def commit(tmp: Path, step: int, keep: int) -> Path:
    """Rename ``tmp`` into place (main process only, after every process has written) and prune."""
    _fsync_tree(tmp)
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # the same step saved again (e.g. final step after a periodic save)
        trash = tmp.parent / f".del-{final.name}-{time.time_ns()}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    prune(tmp.parent.parent, keep)
    return final


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints; older ones are renamed away first, then deleted."""
    ckpts = list_checkpoints(output_dir)
    removed = []
    for p in ckpts[: max(0, len(ckpts) - keep)]:
        trash = p.parent / f".del-{p.name}-{time.time_ns()}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain lists and tensors (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")


def load_rng(ckpt: Path, rank: int) -> bool:
    path = ckpt / "rng" / f"rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


# ---------------------------------------------------------------------------------------------
# trainable weights and optimizer (single process and DDP: every process holds a full copy)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(tmp: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(tmp / "trainable.safetensors"), metadata={"format": "pt"})


def load_trainable(ckpt: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = expected - set(saved), set(saved) - expected
    if missing or unexpected:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not match the model being trained "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); was the config changed?"
        )
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def save_optimizer(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    torch.save(
        {"state": optimizer.state_dict(), "names": _param_names(model, optimizer)},
        tmp / "optimizer.pt",
    )
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")


def load_optimizer(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if saved["names"] != _param_names(model, optimizer):
        raise RuntimeError(f"{ckpt}: optimizer parameter groups differ from the model being trained")
    optimizer.load_state_dict(saved["state"])
    if scheduler is not None and (ckpt / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------
# the manifest: how a checkpoint is verified before it is trusted

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(tmp: Path) -> None:
    """Size and SHA-256 of every file of the checkpoint, written last (after every process has
    written), so a checkpoint whose manifest lists a file at a size it no longer has was damaged
    after it was saved (a full disk, a copy cut short, a truncation)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))


def verify_checkpoint(ckpt: Path, hashes: bool = True) -> str | None:
    """None when ``ckpt`` is intact, else what is wrong with which file. Sizes are always compared;
    ``hashes`` also re-reads every file (the checkpoint is about to be read anyway). A checkpoint
    written before manifests existed is trusted as it is."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{path}: unreadable manifest ({exc})"
    for rel, meta in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != meta["bytes"]:
            return f"{f}: {size} bytes, the manifest says {meta['bytes']} (truncated or overwritten)"
        if hashes and _sha256(f) != meta["sha256"]:
            return f"{f}: content differs from the manifest's SHA-256 (damaged)"
    return None


def newest_intact(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; each damaged newer one is
    reported (the file at fault named) and passed over."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log.warning("resume: checkpoint %s is damaged: %s; trying the one before it", ckpt.name, problem)
    return None


def resolve_resume(output_dir: str | Path, resume: Any) -> Path | None:
    """The checkpoint to resume from: ``auto``/``True`` = the newest intact one in output_dir, or an
    explicit path (a checkpoint, which must be intact, or a run folder)."""
    if resume in (False, None):
        return None
    if resume in (True, "auto"):
        ckpt = newest_intact(output_dir)
        if ckpt is None and resume is True:
            print(f"resume: no intact checkpoint in {checkpoint_root(output_dir)}; starting from scratch")
        return ckpt
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"resume: checkpoint {path} is damaged: {problem}")
        return path
    ckpt = newest_intact(path)
    if ckpt is None:
        raise FileNotFoundError(f"resume: {path} is neither a checkpoint nor a run folder with intact checkpoints")
    return ckpt


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    rank: int,
    keep: int,
    state: dict[str, Any],
    write_main: Callable[[Path], None],
    write_all: Callable[[Path], None] | None = None,
    barrier: Callable[[], None] = lambda: None,
) -> Path | None:
    """Write one checkpoint from every process, atomically.

    ``write_main(tmp)`` runs on rank 0 (weights, optimizer); ``write_all(tmp)`` on every rank
    (sharded engines write their own shards); each rank saves its RNG states. Rank 0 commits
    after a barrier, and every process waits for the commit before training on.
    """
    tmp = begin(output_dir, step, rank=rank, token="w")
    barrier()
    if write_all is not None:
        write_all(tmp)
    if rank == 0:
        write_main(tmp)
        write_state(tmp, state)
    save_rng(tmp, rank)
    barrier()
    if rank == 0:
        write_manifest(tmp)
    final = commit(tmp, step, keep) if rank == 0 else None
    barrier()
    return final
