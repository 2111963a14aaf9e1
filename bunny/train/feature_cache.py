"""Stage-1 feature cache: the frozen vision encoder's outputs, computed once, reused everywhere.

In stage 1 only the projector trains, so the encoder's output for an image never changes: with a
deterministic preprocessing (``square`` resize, no augmentation) it can be computed once and read
back in every epoch and every later run on the same images (a learning-rate sweep of the projector
re-encodes nothing). The loss with and without the cache is the same (the cached tensor is the
encoder's output, stored in the dtype it was produced in).

Layout (``<feature_cache>/<fingerprint>/``)::

    meta.json          what the fingerprint covers (encoder config, weights digest, preprocessing,
                       feature layer, S^2 scales, dtype) and each shard's shape
    index.json         image key -> [shard, row]
    shard-*.npy        [rows, tokens, channels] arrays, opened as numpy memmaps (bf16 stored as uint16)

The fingerprint hashes the encoder's weights, so a different checkpoint (or a fine-tuned tower)
can never read stale features. New images are added as new shards (e.g. a grown data set); each
shard and the index are written to a temporary name and renamed into place, so a killed build
leaves nothing half-written that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes) of ``module``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(encoder: torch.nn.Module, preprocessing: dict[str, Any], dtype: torch.dtype) -> tuple[str, dict]:
    """A short id for (encoder weights + config, preprocessing, output dtype) and what it covers."""
    config = getattr(encoder, "config", None)
    covers = {
        "format": FORMAT_VERSION,
        "encoder": type(encoder).__name__,
        "config": config.to_dict() if hasattr(config, "to_dict") else repr(config),
        "feature_layer": getattr(encoder, "feature_layer", None),
        "feature_select": getattr(encoder, "feature_select", None),
        "scales": getattr(encoder, "scales", None),
        "weights": weights_digest(encoder),
        "preprocessing": preprocessing,
        "dtype": str(dtype).replace("torch.", ""),
    }
    blob = json.dumps(covers, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], covers


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureCache:
    """Cached encoder features under ``root/<fingerprint>``; see the module docstring."""

    def __init__(self, root: str | Path, fp: str, covers: dict | None = None):
        self.dir = Path(root) / fp
        self.fingerprint = fp
        self.covers = covers or {}
        self._index: dict[str, list[int]] | None = None
        self._shards: dict[int, np.ndarray] = {}
        # the dtype the features were *stored* in (meta.json), which can differ from the autocast dtype the
        # fingerprint covers (an encoder may end in a float32 op under bf16 autocast); read on first use
        self.dtype: torch.dtype | None = None

    # -- reading ---------------------------------------------------------------------------------
    @property
    def index(self) -> dict[str, list[int]]:
        if self._index is None:
            path = self.dir / "index.json"
            self._index = json.loads(path.read_text()) if path.is_file() else {}
        return self._index

    def missing(self, keys: Sequence[str]) -> list[str]:
        have = self.index
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in have and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def _meta(self) -> dict:
        path = self.dir / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> torch.Tensor:
        """Features of one image: ``[tokens, channels]`` in the dtype they were produced in."""
        shard, row = self.index[key]
        arr = self._shards.get(shard)
        if arr is None:
            arr = np.load(self.dir / f"shard-{shard:05d}.npy", mmap_mode="r")
            self._shards[shard] = arr
            if self.dtype is None:
                self.dtype = _TORCH_DTYPES[self._meta()["dtype"]]
        t = torch.from_numpy(np.array(arr[row]))  # copy out of the memmap
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state

    # -- building --------------------------------------------------------------------------------
    @torch.no_grad()
    def build(
        self,
        keys: Sequence[str],
        load_pixels: Callable[[str], torch.Tensor],
        encoder: torch.nn.Module,
        *,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        progress: bool = False,
    ) -> int:
        """Encode the images of ``keys`` not cached yet; every process encodes its share.

        Returns the number of images encoded (over all processes).
        """
        todo = self.missing(keys)
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        base = max([s for s, _ in self.index.values()], default=-1) + 1
        mine = todo[rank::world_size]
        shard_id = base + rank
        was_training = encoder.training
        encoder.eval()
        rows: list[np.ndarray] = []
        dtype_name = None
        it = range(0, len(mine), batch_size)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="feature cache", unit="batch")
        for start in it:
            pixels = torch.stack([load_pixels(k) for k in mine[start : start + batch_size]]).to(device)
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                feats = encoder(pixels)
            feats = feats.detach().cpu().contiguous()
            dtype_name = str(feats.dtype).replace("torch.", "")
            np_view = feats.view(torch.uint16) if feats.dtype == torch.bfloat16 else feats
            rows.append(np_view.numpy())
        encoder.train(was_training)
        if rows:
            arr = np.concatenate(rows)
            final = self.dir / f"shard-{shard_id:05d}.npy"
            tmp = self.dir / f".shard-{shard_id:05d}.tmp-{os.getpid()}.npy"
            np.save(tmp, arr)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            (self.dir / f".rows-{shard_id:05d}.json").write_text(
                json.dumps({"keys": mine, "dtype": dtype_name, "shape": list(arr.shape)})
            )
        barrier()
        if rank == 0:  # fold every process's new shard into the index
            index = dict(self.index)
            meta = self._meta() or {"covers": self.covers, "shards": {}}
            for r in range(world_size):
                sid = base + r
                rows_file = self.dir / f".rows-{sid:05d}.json"
                if not rows_file.is_file():
                    continue
                info = json.loads(rows_file.read_text())
                for i, k in enumerate(info["keys"]):
                    index[k] = [sid, i]
                meta["dtype"] = info["dtype"]
                meta["shards"][str(sid)] = info["shape"]
                rows_file.unlink()
            _atomic_write_text(self.dir / "meta.json", json.dumps(meta, indent=1, default=str))
            _atomic_write_text(self.dir / "index.json", json.dumps(index))
        barrier()
        self._index = None
        self._shards = {}
        self.dtype = _TORCH_DTYPES[self._meta()["dtype"]]
        return len(todo)
